"""SamplingParams validation and the sampler: greedy, seeded temperature sampling, top-p."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import torch

from kvbridge.engine.sampling import SamplingParams, make_generator, sample

VOCAB = 50


def _logits(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2.0}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": -1}, "seed"),
        ({"seed": "1"}, "seed"),
        ({"stop_token_ids": (1, -2)}, "stop_token_ids"),
        ({"ignore_eos": 1}, "ignore_eos"),
    ],
)
def test_validation_names_the_key(kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=key):
        SamplingParams(**kwargs)


def test_defaults_and_stop_ids_become_a_tuple() -> None:
    p = SamplingParams(stop_token_ids=[3, 4])  # type: ignore[arg-type]
    assert p.stop_token_ids == (3, 4) and p.max_tokens == 16 and p.greedy
    assert hash(p) == hash(SamplingParams(stop_token_ids=(3, 4)))


def test_greedy_is_argmax_and_needs_no_generator() -> None:
    logits = _logits(4)
    params = [SamplingParams()] * 4
    assert make_generator(params[0]) is None
    assert sample(logits, params, [None] * 4) == logits.argmax(-1).tolist()
    assert sample(logits[:0], [], []) == []


def test_seeded_sampling_repeats_and_varies_with_seed() -> None:
    logits = _logits(1).expand(64, VOCAB)
    p = SamplingParams(temperature=1.0, seed=11)

    def draw(params: SamplingParams) -> list[int]:
        gen = make_generator(params)
        return [sample(logits[i : i + 1], [params], [gen])[0] for i in range(64)]

    first = draw(p)
    assert draw(p) == first
    assert draw(SamplingParams(temperature=1.0, seed=12)) != first
    assert len(set(first)) > 5  # really random, not argmax


def test_seeded_sampling_is_the_same_in_another_process() -> None:
    code = (
        "import torch; from kvbridge.engine.sampling import SamplingParams, make_generator, sample;"
        "l = torch.randn(1, 50, generator=torch.Generator().manual_seed(0)) * 2;"
        "p = SamplingParams(temperature=0.8, seed=5); g = make_generator(p);"
        "print([sample(l, [p], [g])[0] for _ in range(20)])"
    )
    there = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout.strip()
    p = SamplingParams(temperature=0.8, seed=5)
    g = make_generator(p)
    here = [sample(_logits(1), [p], [g])[0] for _ in range(20)]
    assert there == str(here)


def test_mixed_batch_rows_use_their_own_params() -> None:
    logits = _logits(3)
    params = [SamplingParams(), SamplingParams(temperature=1e-4, seed=1), SamplingParams()]
    gens = [make_generator(p) for p in params]
    # A near-zero temperature concentrates all mass on the argmax.
    assert sample(logits, params, gens) == logits.argmax(-1).tolist()
    with pytest.raises(ValueError, match="3 logit rows but 2 params"):
        sample(logits, params[:2], gens[:2])


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = SamplingParams(temperature=1.0, top_p=0.7, seed=3)
    gen = make_generator(p)
    drawn = {sample(logits, [p], [gen])[0] for _ in range(200)}
    assert drawn == {0, 1}  # 0.5 < 0.7 <= 0.8: the first two tokens make the nucleus
    tight = SamplingParams(temperature=1.0, top_p=0.01, seed=3)
    g2 = make_generator(tight)
    assert {sample(logits, [tight], [g2])[0] for _ in range(50)} == {0}
