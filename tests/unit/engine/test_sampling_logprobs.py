"""Logprobs: the raw distribution of the logits the sampler used, through the whole engine."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import BS, TINY, engine, prompt, run

from kvbridge.engine.runner import ModelRunner, SeqChunk
from kvbridge.engine.sampling import MAX_LOGPROBS, SamplingParams, compute_logprobs, sample

VOCAB = 50


def _logits(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("bad", [-1, MAX_LOGPROBS + 1, 1.0, True, "2"])
def test_logprobs_param_is_validated(bad: object) -> None:
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=bad)  # type: ignore[arg-type]


def test_values_ranks_and_top_come_from_log_softmax() -> None:
    logits = _logits(3)
    params = [SamplingParams(logprobs=4), SamplingParams(), SamplingParams(logprobs=0)]
    tokens = [int(logits[0].argsort(descending=True)[2]), 5, 7]
    out = compute_logprobs(logits, params, tokens)
    want = torch.log_softmax(logits, dim=-1)
    first, skipped, bare = out
    assert skipped is None
    assert first is not None and bare is not None
    assert first.token_id == tokens[0] and first.rank == 3
    assert first.logprob == pytest.approx(float(want[0, tokens[0]]), abs=1e-6)
    order = want[0].argsort(descending=True)[:4].tolist()
    assert [t for t, _ in first.top] == order
    assert [lp for _, lp in first.top] == pytest.approx(want[0, order].tolist(), abs=1e-6)
    assert bare.top == () and bare.logprob == pytest.approx(float(want[2, 7]), abs=1e-6)
    assert bare.rank == 1 + int((want[2] > want[2, 7]).sum())


def test_logprobs_are_of_the_raw_distribution_whatever_the_temperature() -> None:
    logits = _logits(1, seed=3)
    hot = SamplingParams(temperature=5.0, top_p=0.5, seed=1, logprobs=2)
    token = sample(logits, [hot], [torch.Generator().manual_seed(1)])[0]
    (lp,) = compute_logprobs(logits, [hot], [token])
    (cold,) = compute_logprobs(logits, [SamplingParams(logprobs=2)], [token])
    assert lp == cold
    assert lp is not None and lp.logprob == pytest.approx(
        float(torch.log_softmax(logits[0], -1)[token]), abs=1e-6
    )


def test_greedy_token_is_rank_one_and_heads_the_top() -> None:
    logits = _logits(4, seed=5)
    params = [SamplingParams(logprobs=MAX_LOGPROBS)] * 4
    tokens = sample(logits, params, [None] * 4)
    for lp, token in zip(compute_logprobs(logits, params, tokens), tokens, strict=True):
        assert lp is not None and lp.rank == 1 and lp.top[0][0] == token
        assert len(lp.top) == MAX_LOGPROBS
        assert lp.top[0][1] == lp.logprob


def test_no_row_asks_no_work() -> None:
    logits = _logits(2)
    assert compute_logprobs(logits, [SamplingParams()] * 2, [0, 1]) == [None, None]
    with pytest.raises(ValueError, match="2 logit rows"):
        compute_logprobs(logits, [SamplingParams()], [0])


def _per_position_logprobs(tokens: list[int], n_prompt: int) -> list[torch.Tensor]:
    """log_softmax of the logits predicting tokens[n_prompt:], each prefix run on its own."""
    rows = []
    for end in range(n_prompt, len(tokens)):
        nblocks = -(-end // BS)
        runner = ModelRunner(TINY, num_blocks=nblocks, block_size=BS, seed=0)
        logits = runner.execute([SeqChunk("ref", tokens[:end], 0, list(range(nblocks)), True)])
        rows.append(torch.log_softmax(logits[0], dim=-1))
    return rows


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_engine_reports_one_entry_per_token_matching_a_separate_forward(temperature: float):
    p = prompt(11, seed=4)
    eng = engine()
    params = SamplingParams(max_tokens=5, ignore_eos=True, temperature=temperature, seed=9,
                            logprobs=3)  # fmt: skip
    rid = eng.add_request(p, params)
    plain = eng.add_request(p, SamplingParams(max_tokens=2, ignore_eos=True))
    final = run(eng)
    out = final[rid]
    assert final[plain].logprobs is None
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids) == 5
    ref = _per_position_logprobs([*p, *out.token_ids], len(p))
    for lp, token, want in zip(out.logprobs, out.token_ids, ref, strict=True):
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(float(want[token]), abs=1e-4)
        assert [t for t, _ in lp.top] == want.topk(3).indices.tolist()
        if temperature == 0.0:
            assert lp.rank == 1
