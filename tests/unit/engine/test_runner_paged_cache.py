"""ModelRunner: KV cache layout and slot writes, layer hooks, shared prefixes, validation."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch

from kvbridge.connector.types import KVCacheLayout
from kvbridge.engine.loader import init_random, save_hf_checkpoint
from kvbridge.engine.model_config import NAMED_CONFIGS
from kvbridge.engine.runner import ModelRunner, SeqChunk

TINY = NAMED_CONFIGS["tiny"]
BS = 4
NB = 32


def _runner(**kw: object) -> ModelRunner:
    args: dict[str, object] = {"num_blocks": NB, "block_size": BS, "seed": 0, **kw}
    return ModelRunner(TINY, **args)  # type: ignore[arg-type]


def _prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(TINY.vocab_size) for _ in range(n)]


class RecordingHooks:
    def __init__(self, fill: dict[str, torch.Tensor] | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        self.saved: list[torch.Tensor] = []
        self.fill = fill  # layer -> cache contents to copy in before the layer runs
        self.target: dict[str, torch.Tensor] = {}

    def before_layer(self, layer_name: str) -> None:
        self.calls.append(("before", layer_name))
        if self.fill is not None:
            self.target[layer_name].copy_(self.fill[layer_name])

    def after_layer(self, layer_name: str, kv_cache: torch.Tensor) -> None:
        self.calls.append(("after", layer_name))
        self.saved.append(kv_cache)


def test_cache_layout_and_spec() -> None:
    runner = _runner(dtype=torch.bfloat16)
    assert list(runner.kv_caches) == ["layers.0", "layers.1"]
    spec = runner.cache_spec
    assert spec.layout == KVCacheLayout.BLOCKS_FIRST and spec.dtype == "bfloat16"
    assert (spec.num_blocks, spec.block_size, spec.num_layers) == (NB, BS, 2)
    for cache in runner.kv_caches.values():
        assert cache.shape == (NB, 2, BS, TINY.num_kv_heads, TINY.head_dim)
        assert cache.dtype == torch.bfloat16 and cache.is_contiguous()
        # One block-layer (K and V) is one contiguous region of block_bytes_per_layer bytes.
        assert cache[3].is_contiguous()
        step = cache[4].data_ptr() - cache[3].data_ptr()
        assert step == cache[3].numel() * cache.element_size() == spec.block_bytes_per_layer


def test_kv_written_at_slot_mapping() -> None:
    runner = _runner()
    ids = _prompt(10)
    table = [9, 2, 30]
    runner.execute([SeqChunk("r", ids, 0, table, True)])
    cache = runner.kv_caches["layers.0"]
    weights = runner.model.hf_tensors()
    with torch.inference_mode():
        x = runner.model.model.layers[0].input_layernorm(
            runner.model.model.embed_tokens(torch.tensor(ids))
        )
        v = x @ weights["model.layers.0.self_attn.v_proj.weight"].T
        k0 = x[0] @ weights["model.layers.0.self_attn.k_proj.weight"].T  # RoPE(0) = identity
        v = v.view(len(ids), TINY.num_kv_heads, TINY.head_dim)
        k0 = k0.view(TINY.num_kv_heads, TINY.head_dim)
    for pos in range(len(ids)):
        block, off = table[pos // BS], pos % BS
        torch.testing.assert_close(cache[block, 1, off], v[pos])
    torch.testing.assert_close(cache[9, 0, 0], k0)
    untouched = [b for b in range(NB) if b not in table]
    assert not cache[untouched].any()
    assert not cache[30, :, 2:].any()  # slots past the last token stay empty


def test_hooks_wrap_each_layer_in_order() -> None:
    runner = _runner()
    hooks = RecordingHooks()
    runner.execute([SeqChunk("r", _prompt(5), 0, [0, 1], True)], hooks)
    assert hooks.calls == [
        ("before", "layers.0"),
        ("after", "layers.0"),
        ("before", "layers.1"),
        ("after", "layers.1"),
    ]
    assert hooks.saved[0] is runner.kv_caches["layers.0"]
    assert hooks.saved[1] is runner.kv_caches["layers.1"]
    empty = RecordingHooks()
    assert runner.execute([], empty).shape == (0, TINY.vocab_size) and empty.calls == []


def test_kv_loaded_in_before_layer_is_used() -> None:
    """A connector-style load: blocks filled layer by layer in before_layer, last token computed."""
    ids, table = _prompt(11), [5, 6, 7]
    source = _runner()
    want = source.execute([SeqChunk("r", ids, 0, table, True)])
    consumer = _runner()
    hooks = RecordingHooks(fill={k: v.clone() for k, v in source.kv_caches.items()})
    hooks.target = consumer.kv_caches
    got = consumer.execute([SeqChunk("r", ids[-1:], len(ids) - 1, table, True)], hooks)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Without the load the consumer attends over empty blocks and gets other logits.
    cold = _runner().execute([SeqChunk("r", ids[-1:], len(ids) - 1, table, True)])
    assert not torch.allclose(cold, want, atol=1e-3)


def test_shared_prefix_blocks_are_read_not_recomputed() -> None:
    prefix = _prompt(8, seed=1)  # two full blocks
    a, b = [*prefix, *_prompt(3, seed=2)], [*prefix, *_prompt(6, seed=3)]
    runner = _runner()
    runner.execute([SeqChunk("a", a, 0, [10, 11, 12], False)])
    # b reuses a's two prefix blocks and computes only its own suffix, batched with a's decode.
    out = runner.execute(
        [
            SeqChunk("b", b[8:], 8, [10, 11, 20, 21], True),
            SeqChunk("a", [42], len(a), [10, 11, 12], True),
        ]
    )
    alone_b = _runner().execute([SeqChunk("b", b, 0, [0, 1, 2, 3], True)])
    alone_a = _runner().execute([SeqChunk("a", [*a, 42], 0, [0, 1, 2], True)])
    torch.testing.assert_close(out, torch.cat([alone_b, alone_a]), rtol=1e-5, atol=1e-5)


def test_decode_batch_with_unequal_lengths() -> None:
    prompts = [_prompt(n, seed=n) for n in (3, 9, 4, 14)]
    tables = [[4 * i + j for j in range(4)] for i in range(len(prompts))]
    runner = _runner()
    runner.execute(
        [SeqChunk(f"r{i}", p, 0, t, False) for i, (p, t) in enumerate(zip(prompts, tables))]
    )
    batch = runner.execute(
        [SeqChunk(f"r{i}", [7], len(p), t, True) for i, (p, t) in enumerate(zip(prompts, tables))]
    )
    for i, (p, t) in enumerate(zip(prompts, tables)):
        alone = _runner().execute([SeqChunk("x", [*p, 7], 0, t, True)])
        torch.testing.assert_close(batch[i : i + 1], alone, rtol=1e-5, atol=1e-5)


def test_bfloat16_close_to_float32() -> None:
    ids = _prompt(12)
    f32 = _runner().execute([SeqChunk("r", ids, 0, [0, 1, 2], True)])
    bf16 = _runner(dtype=torch.bfloat16).execute([SeqChunk("r", ids, 0, [0, 1, 2], True)])
    assert bf16.dtype == torch.float32
    assert (bf16 - f32).abs().max() < 0.05 * f32.abs().max()


def test_no_sampled_chunk_returns_empty_logits() -> None:
    out = _runner().execute([SeqChunk("r", _prompt(5), 0, [0, 1], False)])
    assert out.shape == (0, TINY.vocab_size)


@pytest.mark.parametrize(
    ("chunk", "message"),
    [
        (SeqChunk("r1", [], 0, [0], True), "r1: token_ids is empty"),
        (SeqChunk("r2", [1] * 5, 0, [0], True), "r2: block_table has 1 blocks, 5 tokens need 2"),
        (SeqChunk("r3", [1], 0, [NB], True), r"r3: block ids \[32\] outside"),
        (SeqChunk("r4", [TINY.vocab_size], 0, [0], True), "r4: token id outside"),
        (SeqChunk("r5", [1], -1, [0], True), "r5: start_pos -1"),
    ],
)
def test_bad_chunks_are_rejected(chunk: SeqChunk, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _runner().execute([chunk])


def test_constructor_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        _runner(num_blocks=0)
    with pytest.raises(ValueError, match="block_size"):
        _runner(block_size=-4)
    save_hf_checkpoint(init_random(TINY), TINY, tmp_path)
    other = dataclasses.replace(TINY, rope_theta=500000.0)
    with pytest.raises(ValueError, match=r"model_config: does not match.*rope_theta"):
        ModelRunner(other, num_blocks=4, block_size=4, checkpoint=str(tmp_path))


def test_seeded_runners_agree_and_seeds_differ() -> None:
    chunk = SeqChunk("r", _prompt(6), 0, [0, 1], True)
    a, b, c = _runner(seed=3), _runner(seed=3), _runner(seed=4)
    assert torch.equal(a.execute([chunk]), b.execute([chunk]))
    assert not torch.equal(a.execute([chunk]), c.execute([chunk]))


def test_estimate_num_blocks() -> None:
    per_block = 2 * BS * TINY.num_kv_heads * TINY.head_dim * TINY.num_layers * 4
    n = ModelRunner.estimate_num_blocks(TINY, block_size=BS, budget_bytes=10 * per_block + 5)
    assert n == 10
    assert _runner(num_blocks=n).cache_spec.block_bytes == per_block
    half = ModelRunner.estimate_num_blocks(
        TINY, block_size=BS, budget_bytes=10 * per_block, dtype=torch.bfloat16
    )
    assert half == 20
