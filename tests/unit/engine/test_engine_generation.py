"""LLMEngine end to end on the tiny random model: the same tokens whatever the scheduling."""

from __future__ import annotations

import pytest
from engine_helpers import BS, GREEDY, engine, generate, prompt, run

from kvbridge.engine.sampling import SamplingParams

PROMPTS = [prompt(n, seed=n) for n in (5, 13, 22, 9)]


@pytest.fixture(scope="module")
def baseline() -> list[list[int]]:
    """One request at a time, big pool, no prefix caching, no chunking."""
    out = []
    for p in PROMPTS:
        eng = engine(enable_prefix_caching=False, enable_chunked_prefill=False)
        out.extend(generate(eng, [p]))
    return out


def test_batched_generation_matches_one_at_a_time(baseline: list[list[int]]) -> None:
    eng = engine()
    assert generate(eng, PROMPTS) == baseline
    assert all(len(t) == GREEDY.max_tokens for t in baseline)


def test_prefix_cache_reuses_blocks_and_keeps_tokens(baseline: list[list[int]]) -> None:
    shared = prompt(20, seed=99)
    a, b = [*shared, 1, 2, 3], [*shared, 4, 5]
    ref = [generate(engine(enable_prefix_caching=False), [p])[0] for p in (a, b)]
    eng = engine()
    ida = eng.add_request(a, GREEDY)
    first = run(eng)
    idb = eng.add_request(b, GREEDY)
    second = run(eng)
    assert [first[ida].token_ids, second[idb].token_ids] == ref
    assert first[ida].num_cached_tokens == 0
    assert second[idb].num_cached_tokens == 20  # 5 full shared blocks of 4
    stats = eng.block_manager.stats()
    assert stats.hit_blocks == 5 and stats.hit_tokens == 20
    # The same prompt again: everything but the last token's block is a hit.
    idc = eng.add_request(a, GREEDY)
    third = run(eng)
    assert third[idc].token_ids == ref[0]
    assert third[idc].num_cached_tokens == (len(a) - 1) // BS * BS


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_in_a_tiny_pool_gives_the_same_tokens(
    baseline: list[list[int]], prefix_caching: bool
) -> None:
    # 10 blocks of 4 = 40 slots for 4 requests that end at 13..30 tokens each.
    eng = engine(num_gpu_blocks=10, max_model_len=40, enable_prefix_caching=prefix_caching)
    assert generate(eng, PROMPTS) == baseline
    assert eng.scheduler.num_preemptions > 0


@pytest.mark.parametrize("budget", [3, 8])
def test_chunked_prefill_gives_the_same_tokens(baseline: list[list[int]], budget: int) -> None:
    eng = engine(max_num_batched_tokens=budget, enable_chunked_prefill=True)
    assert generate(eng, PROMPTS) == baseline
    # Prompts of up to 22 tokens in chunks of `budget`: more steps than tokens generated.
    assert eng.num_steps >= -(-22 // budget) + GREEDY.max_tokens - 1


def test_max_num_seqs_limits_the_batch(baseline: list[list[int]]) -> None:
    eng = engine(max_num_seqs=1)
    assert generate(eng, PROMPTS) == baseline
    assert eng.num_steps == len(PROMPTS) * GREEDY.max_tokens


def test_seeded_sampling_is_reproducible_even_across_preemption() -> None:
    params = [SamplingParams(max_tokens=10, temperature=1.0, seed=s) for s in (1, 2, 3)]
    prompts = PROMPTS[:3]

    def sample_with(**kw: object) -> list[list[int]]:
        eng = engine(**kw)
        ids = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
        final = run(eng)
        return [final[i].token_ids for i in ids]

    big = sample_with()
    assert sample_with() == big
    tiny = engine(num_gpu_blocks=9, max_model_len=36)
    ids = [tiny.add_request(p, sp) for p, sp in zip(prompts, params)]
    final = run(tiny)
    assert tiny.scheduler.num_preemptions > 0
    assert [final[i].token_ids for i in ids] == big
    other_seed = engine()
    oid = other_seed.add_request(prompts[0], SamplingParams(10, temperature=1.0, seed=4))
    assert run(other_seed)[oid].token_ids != big[0]


def test_stop_token_and_eos_end_the_request(baseline: list[list[int]]) -> None:
    tokens = baseline[1]
    eng = engine()
    stop = SamplingParams(max_tokens=8, stop_token_ids=(tokens[2],))
    out = eng.generate([PROMPTS[1]], stop)[0]
    first_stop = tokens.index(tokens[2])
    assert out.finish_reason == "stop" and out.token_ids == tokens[: first_stop + 1]
    assert out.ttft is not None and out.ttft >= 0
    length = eng.generate([PROMPTS[1]], SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert length.finish_reason == "length" and length.token_ids == tokens[:3]


def test_max_model_len_caps_generation() -> None:
    eng = engine(max_model_len=16)
    out = eng.generate([prompt(12)], SamplingParams(max_tokens=20, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 16 - 12  # prompt + output <= 16
