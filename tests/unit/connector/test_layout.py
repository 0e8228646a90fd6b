"""Block rows over every layout the workers accept, and the refusals that name the layer."""

from __future__ import annotations

import pytest
import torch

from kvbridge.config import ConfigError
from kvbridge.connector.layout import block_rows, layer_shape
from kvbridge.connector.types import KVCacheLayout, KVCacheSpec

NB, BS, H, D = 6, 4, 2, 3


def spec(layout: KVCacheLayout) -> KVCacheSpec:
    return KVCacheSpec(
        block_size=BS, num_blocks=NB, num_layers=2, num_kv_heads=H, head_dim=D,
        dtype="float32", layout=layout,
    )  # fmt: skip


def vllm_layer(order: str, layers: int = 2) -> list[torch.Tensor]:
    """Per-layer logical [B, H, N, C] views over one buffer in vLLM's physical ``order``."""
    sizes = {"L": layers, "B": NB, "H": H, "N": BS, "C": 2 * D}
    raw = torch.arange(torch.Size(sizes.values()).numel(), dtype=torch.float32)
    phys = raw.view(*(sizes[a] for a in order))
    logical = phys.permute(*(order.index(a) for a in "LBHNC"))
    return list(logical.unbind(0))


@pytest.mark.parametrize(
    ("layout", "order"),
    [
        (KVCacheLayout.VLLM_LBHNC, "LBHNC"),
        (KVCacheLayout.VLLM_LBNHC, "LBNHC"),
        (KVCacheLayout.VLLM_BLHNC, "BLHNC"),
        (KVCacheLayout.VLLM_BLNHC, "BLNHC"),
    ],
)
def test_rows_are_each_blocks_own_bytes_in_every_vllm_layout(
    layout: KVCacheLayout, order: str
) -> None:
    s = spec(layout)
    for layer in vllm_layer(order):
        rows = block_rows(s, "l", layer)
        assert rows.shape == (NB, s.block_bytes_per_layer // 4)
        assert rows.data_ptr() == layer.data_ptr()  # a view, no copy
        for b in range(NB):  # row b holds exactly block b's elements, in memory order
            assert sorted(rows[b].tolist()) == sorted(layer[b].flatten().tolist())
        rows[3].fill_(-1.0)  # writes land in block 3 only
        assert bool((layer[3] == -1).all()) and not bool((layer[2] == -1).any())


def test_blocks_first_rows_match_the_reference_engines_cache() -> None:
    s = spec(KVCacheLayout.BLOCKS_FIRST)
    t = torch.randn(layer_shape(s))
    assert torch.equal(block_rows(s, "l", t), t.view(NB, -1))


@pytest.mark.parametrize(
    ("layout", "order", "message"),
    [
        (KVCacheLayout.VLLM_LBHNC, "LBNHC", "dense run in the order vllm_lbhnc"),  # wrong order
        (KVCacheLayout.VLLM_LBHNC, "LHBNC", "dense run"),  # heads outside blocks
        (KVCacheLayout.VLLM_LBHNC, "BHLNC", "dense run"),
    ],
)
def test_a_block_split_across_memory_or_in_another_order_is_refused(
    layout: KVCacheLayout, order: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=rf"kv_caches\['l'\].*{message}"):
        block_rows(spec(layout), "l", vllm_layer(order)[0])


def test_shape_dtype_and_split_layouts_are_refused_with_the_layer_name() -> None:
    s = spec(KVCacheLayout.VLLM_LBHNC)
    with pytest.raises(ConfigError, match=r"kv_caches\['x'\].*declares \(6, 2, 4, 6\)"):
        block_rows(s, "x", torch.zeros(NB, H, BS, D))
    with pytest.raises(ConfigError, match="float32"):
        block_rows(s, "x", torch.zeros(layer_shape(s), dtype=torch.float16))
    kv_first = spec(KVCacheLayout.KV_FIRST)
    with pytest.raises(ConfigError, match="splits a block"):
        block_rows(kv_first, "x", torch.zeros(layer_shape(kv_first)))
