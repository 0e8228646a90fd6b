"""``matmul_attention`` (a few query rows over a long context on CUDA) against SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvbridge.engine.attention import matmul_attention, use_matmul_attention


def _qkv(batch: int, heads: int, rows: int, keys: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, 32, generator=gen) for n in (rows, keys, keys)]


def test_matches_sdpa_for_a_chunk_after_a_prefix_hit() -> None:
    # 4 folded groups x 5 new tokens after 300 cached ones: query i sees keys 0..300 + i.
    q, k, v = _qkv(1, 2, 4 * 5, 305)
    keys = torch.arange(305)
    mask = (keys[None, :] <= keys[300:, None]).repeat(4, 1)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    got = matmul_attention(q, k, v, mask)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    wrong = matmul_attention(q, k, v, mask.roll(1, dims=1))  # the mask must matter
    assert not torch.allclose(wrong, want, atol=1e-3)


def test_matches_sdpa_for_a_padded_decode_batch() -> None:
    q, k, v = _qkv(3, 2, 4, 64, seed=1)
    lens = torch.tensor([64, 17, 40])
    mask = (torch.arange(64)[None, :] < lens[:, None])[:, None, None, :]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.allclose(matmul_attention(q, k, v, mask), want, atol=1e-5, rtol=1e-5)
    assert matmul_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), None).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("device", "heads", "rows", "keys", "expected"),
    [
        ("cuda", 8, 64, 32768, True),  # a 16-token chunk of Llama-8B after a 32k hit
        ("cuda", 8, 4, 8192, True),  # decode at batch 1
        ("cpu", 8, 64, 32768, False),  # CPU keeps SDPA
        ("cuda", 8, 8192, 32768, False),  # a long chunk fills the GPU through SDPA
        ("cuda", 8, 64, 512, False),  # a short context
        ("cuda", 56, 4, 32768, False),  # batch 7 decode: float32 K/V over the byte cap
        ("cuda", 8, 64, 131072, False),  # a 128k hit: likewise
    ],
)
def test_the_rule_picks_matmul_only_for_few_rows_over_many_keys(
    device: str, heads: int, rows: int, keys: int, expected: bool
) -> None:
    assert use_matmul_attention(device, heads, rows, keys) is expected


@pytest.mark.parametrize("keys", [64, 305])  # a multiple of the chunk, and padded
def test_probs_times_values_summed_over_key_chunks(
    monkeypatch: pytest.MonkeyPatch, keys: int
) -> None:
    monkeypatch.setattr("kvbridge.engine.attention.KEY_CHUNK", 16)
    q, k, v = _qkv(2, 2, 6, keys, seed=2)
    mask = torch.rand(2, 1, 6, keys, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[..., 0] = True  # every row attends to something
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.allclose(matmul_attention(q, k, v, mask), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "keys",
    [
        87041,  # 87,041 keys fit the cap; padded to 88,064 they do not
        86016,  # a multiple of the chunk: the 84 partial outputs (22 MiB) tip it over
    ],
)
def test_the_byte_cap_counts_padded_keys_and_partial_outputs(keys: int) -> None:
    # 8 KV heads x 64 folded rows, head_dim 128: just over 1 GiB of float32 temporaries
    heads, rows, dim = 8, 64, 128
    padded = -(-keys // 1024) * 1024
    nbytes = 2 * heads * padded * dim * 4 + 2 * heads * rows * padded * 4
    nbytes += heads * (padded // 1024) * rows * dim * 4
    assert nbytes > 1 << 30
    assert use_matmul_attention("cuda", heads, rows, keys, dim) is False
