"""kvbridge.oracle: what passes, what is flagged, and the reference it compares against."""

from __future__ import annotations

import math
from typing import Any

import pytest

from kvbridge.engine.engine import EngineConfig
from kvbridge.oracle import TOLERANCE, OracleError, Trace, check, reference

REF = Trace((5, 6, 7), (-1.0, -2.0, -3.0), ({5: -1.0, 9: -1.00005}, {6: -2.0}, {7: -3.0}))


def test_an_answer_within_the_tolerance_passes_and_its_worst_gap_is_reported() -> None:
    verdict = check(REF, Trace((5, 6, 7), (-1.0, -2.0 + 0.5 * TOLERANCE, -3.0)))
    assert verdict.ok and verdict.compared == 3
    assert verdict.max_abs_diff == pytest.approx(0.5 * TOLERANCE)


def test_the_same_tokens_with_a_logprob_off_by_more_than_the_tolerance_are_flagged() -> None:
    """What greedy-token equality misses: every token right, one distribution moved."""
    verdict = check(REF, Trace((5, 6, 7), (-1.0, -2.0, -3.0 - 3 * TOLERANCE)))
    assert not verdict.ok and verdict.problem is not None
    assert verdict.problem.startswith("token 2 (7): logprob")
    assert verdict.max_abs_diff == pytest.approx(3 * TOLERANCE)
    assert not check(REF, Trace((5, 6, 7), (-1.0, math.nan, -3.0))).ok


def test_another_token_passes_only_at_a_near_tie_and_comparison_stops_there() -> None:
    tie = check(REF, Trace((9, 1, 1), (-1.00005, -8.0, -8.0)))  # 9 is 5e-5 below 5
    assert tie.ok and tie.compared == 0
    not_a_tie = check(REF, Trace((5, 8, 7), (-1.0, -2.0, -3.0)))  # 8 is not in the top-k
    assert not not_a_tie.ok and not_a_tie.problem == (
        "token 1: 8 (logprob -2.000000), reference 6 (logprob -2.000000)"
    )
    far = Trace((9,), (-1.5,), ({9: -1.5, 5: -1.0},))  # in the top-k, but 0.5 nats off
    assert not check(Trace((5,), (-1.0,), ({5: -1.0, 9: -1.5},)), far).ok
    no_alternatives = Trace((5,), (-1.0,))  # a reference read from HTTP keeps none
    assert not check(no_alternatives, Trace((9,), (-1.0,))).ok


def test_a_short_or_long_answer_is_flagged() -> None:
    assert check(REF, Trace((5, 6), (-1.0, -2.0))).problem == "2 tokens, reference 3"
    assert not check(REF, Trace((5, 6, 7, 8), (-1.0, -2.0, -3.0, -4.0))).ok


def test_choices_whole_or_streamed_make_the_same_trace_and_missing_logprobs_are_an_error() -> None:
    whole: dict[str, Any] = {"token_ids": [5, 6], "logprobs": {"token_logprobs": [-1.0, -2.0]}}
    chunks: list[dict[str, Any]] = [
        {"token_ids": [5], "logprobs": {"token_logprobs": [-1.0]}},
        {"token_ids": [], "logprobs": None},  # the last chunk: only a finish reason
        {"token_ids": [6], "logprobs": {"token_logprobs": [-2.0]}},
    ]
    assert Trace.from_choices([whole]) == Trace.from_choices(chunks) == Trace((5, 6), (-1.0, -2.0))
    with pytest.raises(OracleError, match="logprobs: k"):
        Trace.from_choices([{"token_ids": [5, 6], "logprobs": None}])
    with pytest.raises(OracleError, match="2 tokens but 1"):
        Trace((5, 6), (-1.0,))
    with pytest.raises(OracleError, match="tolerance"):
        check(REF, REF, tol=-1.0)


def test_the_reference_engine_repeats_itself_exactly() -> None:
    """The oracle's noise floor: two monolithic runs of the same prompts (batched alike) give
    identical logprobs; P/D's measured noise (see the module docstring) comes from batching."""
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7, 6, 5]]
    config = EngineConfig(model="tiny", num_gpu_blocks=32, block_size=4)
    first, second = (reference(prompts, config, max_tokens=4) for _ in range(2))
    for p in first:
        verdict = check(first[p], second[p], tol=0.0)
        assert verdict.ok and verdict.compared == 4 and len(first[p].top[0]) == 5
