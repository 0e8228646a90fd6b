"""The reference: a monolithic in-process engine (same model and seed, no connector) answers
every prompt the demo sent, and ``kvbridge.oracle`` judges each served answer against it, token
by token and log-probability by log-probability."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from kvbridge.demo.workload import RequestRecord
from kvbridge.oracle import TOLERANCE, OracleError, Trace, check, reference

logger = logging.getLogger(__name__)

Tokens = tuple[int, ...]


class Mismatch(NamedTuple):
    """A request the oracle flagged (or that failed), and why."""

    record: RequestRecord
    expected: Trace | None
    problem: str


class Comparison(NamedTuple):
    """The oracle's verdicts on one run."""

    identical: int  # answers that pass
    mismatches: list[Mismatch]
    max_abs_diff: float  # largest |logprob difference| over the passing answers' tokens


def reference_outputs(
    prompts: Iterable[Tokens],
    *,
    model: str,
    device: str,
    seed: int,
    max_tokens: int,
    block_size: int,
    cpu_threads: int | None = None,
) -> dict[Tokens, Trace]:
    """prompt -> greedy ``Trace`` of an ``LLMEngine`` without a connector (each prompt once).

    ``cpu_threads``: torch's thread count on CPU, as the servers run (idle OpenMP threads
    spinning on a busy machine slow a tiny model down a hundredfold).
    """
    import torch

    from kvbridge.engine.engine import EngineConfig

    unique = list(dict.fromkeys(prompts))
    if not unique:
        return {}
    longest = max(len(p) for p in unique) + max_tokens
    config = EngineConfig(
        model=model,
        device=device,
        seed=seed,
        block_size=block_size,
        num_gpu_blocks=max(256, 2 * math.ceil(longest / block_size)),
    )
    if device == "cpu" and cpu_threads is not None:
        torch.set_num_threads(cpu_threads)
    return reference(unique, config, max_tokens=max_tokens, ignore_eos=False)


def compare(
    records: Sequence[RequestRecord], expected: dict[Tokens, Trace], tol: float = TOLERANCE
) -> Comparison:
    """The oracle's verdict on each record; a failed request, or one with no reference or no
    log-probabilities, is a mismatch."""
    mismatches: list[Mismatch] = []
    worst = 0.0
    for r in records:
        want = expected.get(r.prompt)
        if r.error is not None or want is None:
            mismatches.append(Mismatch(r, want, r.error or "no reference answer"))
            continue
        try:
            verdict = check(want, Trace(r.token_ids, r.logprobs), tol)
        except OracleError as e:
            mismatches.append(Mismatch(r, want, str(e)))
            continue
        if verdict.problem is not None:
            mismatches.append(Mismatch(r, want, verdict.problem))
        else:
            worst = max(worst, verdict.max_abs_diff)
    return Comparison(len(records) - len(mismatches), mismatches, worst)
