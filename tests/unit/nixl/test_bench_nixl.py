"""`kvbridge bench nixl`: each raw baseline moves the connector's bytes in its descriptors."""

from __future__ import annotations

import pytest

from kvbridge.bench.nixl import Case, block_ids, raw_key
from kvbridge.bench.nixl_peer import make_spec
from kvbridge.nixl.transfers import KVRegions, plan_read

LAYERS, BLOCKS = 3, 5


def _shape(items: list[tuple[int, int]]) -> list[tuple[int, bool]]:
    """Per descriptor: its length, and whether it starts where the previous one ended."""
    out = []
    for k, (addr, length) in enumerate(items):
        prev_addr, prev_len = items[k - 1] if k else (-1, 0)
        out.append((length, k > 0 and prev_addr + prev_len == addr))
    return out


def _connector_descs(case: Case) -> list[tuple[int, int]]:
    spec = make_spec(LAYERS, BLOCKS, 64)
    stride = spec.block_bytes_per_layer
    layer_bytes = spec.num_blocks * stride
    regions = KVRegions(
        layer_names=tuple(f"layers.{i}" for i in range(LAYERS)),
        base_addrs=tuple((2 * i + 1) * layer_bytes for i in range(LAYERS)),  # apart, as tensors
        block_len=stride,
        block_stride=stride,
        num_blocks=spec.num_blocks,
        memory_type="DRAM",
        device_id=0,
    )
    ids = block_ids(case.pattern, BLOCKS)
    plan = plan_read(regions, regions, [list(range(LAYERS))], [ids], [ids], merge=case.merge)
    if plan.merged:
        return [(addr, length) for addr, length, _ in plan.remote_items]
    per_block = regions.block_items()
    return [(per_block[i][0], per_block[i][1]) for i in plan.remote_indices]


@pytest.mark.parametrize(
    "case", [Case(p, m) for p in ("contiguous", "fragmented") for m in (True, False)]
)
def test_raw_baseline_has_the_connectors_descriptor_sizes_and_adjacency(case: Case) -> None:
    spec = make_spec(LAYERS, BLOCKS, 64)
    key = raw_key(case, spec, BLOCKS)
    assert all(0 <= b < key.num_blocks for b in key.block_ids)
    raw = [(b * key.block_bytes, key.block_bytes) for b in key.block_ids]
    connector = _connector_descs(case)
    assert _shape(raw) == _shape(connector)
    assert sum(n for _, n in raw) == LAYERS * BLOCKS * spec.block_bytes_per_layer
    merged_one_per_layer = case == Case("contiguous", True)
    assert len(raw) == (LAYERS if merged_one_per_layer else LAYERS * BLOCKS)
