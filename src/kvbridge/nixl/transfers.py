"""Descriptor planning for NIXL READs: block regions, contiguous-run merging, read plans.

Index of block ``b`` of layer ``l`` in a prepared per-block dlist::

    l * num_blocks + b        (layers in registration order)

A READ pairs local and remote block ids position by position. Pairs that are consecutive on
*both* sides form a run, and a run of one layer is one descriptor of ``length * block_len``
bytes (BLOCKS_FIRST: a layer's blocks are back to back)::

    local  [7 8 9 | 3 | 4]      remote [20 21 22 | 5 | 9]   ->   runs (7,20,3) (3,5,1) (4,9,1)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from kvbridge.nixl.transport import XferItem


class BlockRun(NamedTuple):
    """``length`` blocks from ``local_start`` and ``remote_start`` on, consecutive on both sides."""

    local_start: int
    remote_start: int
    length: int


def merge_runs(local: Sequence[int], remote: Sequence[int]) -> list[BlockRun]:
    """Group the pairs ``(local[i], remote[i])`` into maximal runs contiguous on both sides.

    Pairs are merged in local-id order (a READ may move them in any order), so block ids that
    an allocator handed out in descending order still merge.
    """
    if len(local) != len(remote):
        raise ValueError(f"merge_runs: {len(local)} local vs {len(remote)} remote block ids")
    runs: list[BlockRun] = []
    for loc, rem in sorted(zip(local, remote)):
        if runs:
            last = runs[-1]
            if loc == last.local_start + last.length and rem == last.remote_start + last.length:
                runs[-1] = last._replace(length=last.length + 1)
                continue
        runs.append(BlockRun(loc, rem, 1))
    return runs


@dataclass(frozen=True)
class KVRegions:
    """Where one engine's KV blocks live: per layer a base address, all with one geometry."""

    layer_names: tuple[str, ...]
    base_addrs: tuple[int, ...]
    block_len: int  # bytes of one block of one layer
    block_stride: int  # bytes between consecutive blocks of one layer
    num_blocks: int
    memory_type: str  # "DRAM" | "VRAM"
    device_id: int

    def __post_init__(self) -> None:
        if len(self.layer_names) != len(self.base_addrs) or not self.layer_names:
            raise ValueError("KVRegions: need one base address per layer, at least one layer")
        if self.block_len <= 0 or self.block_stride < self.block_len or self.num_blocks <= 0:
            raise ValueError(
                f"KVRegions: bad geometry (block_len={self.block_len}, "
                f"stride={self.block_stride}, num_blocks={self.num_blocks})"
            )

    @property
    def mergeable(self) -> bool:
        """Consecutive blocks of a layer are adjacent in memory."""
        return self.block_stride == self.block_len

    def region_items(self) -> list[tuple[int, int, int, str]]:
        """One registration item per layer: ``(addr, bytes, device_id, "")``."""
        size = self.block_stride * (self.num_blocks - 1) + self.block_len
        return [(addr, size, self.device_id, "") for addr in self.base_addrs]

    def block_items(self) -> list[XferItem]:
        """One descriptor per (layer, block), in prepared-dlist index order."""
        return [
            (base + b * self.block_stride, self.block_len, self.device_id)
            for base in self.base_addrs
            for b in range(self.num_blocks)
        ]

    def run_item(self, layer: int, start: int, length: int) -> XferItem:
        addr = self.base_addrs[layer] + start * self.block_stride
        return (addr, length * self.block_len, self.device_id)

    def index(self, layer: int, block: int) -> int:
        return layer * self.num_blocks + block

    def check_blocks(self, block_ids: Sequence[int], side: str) -> None:
        bad = [b for b in block_ids if not 0 <= b < self.num_blocks]
        if bad:
            raise ValueError(f"{side} block id {bad[0]} outside 0..{self.num_blocks - 1}")


@dataclass(frozen=True)
class ReadPlan:
    """One READ: indices into the per-block dlists prepared once per remote, in run order.

    ``merged`` plans order the indices so that each run of blocks contiguous on both sides is
    consecutive (NIXL joins consecutive adjacent descriptors into one). The joined
    descriptors themselves (``local_items``/``remote_items``, one per layer and run) are
    built only on demand: the READ does not need them, a baseline that prepares them does.
    """

    local_indices: list[int]
    remote_indices: list[int]
    num_bytes: int
    num_block_layers: int  # (block, layer) pairs moved
    num_descs: int  # descriptors once NIXL joins the runs (one per block and layer if none)
    group_runs: tuple[tuple[Sequence[int], list[BlockRun]], ...] = ()  # merged: layers, runs
    regions: tuple[KVRegions, KVRegions] | None = field(default=None, repr=False)

    @property
    def merged(self) -> bool:
        return bool(self.group_runs)

    @property
    def local_items(self) -> list[XferItem]:
        return self._items(0)

    @property
    def remote_items(self) -> list[XferItem]:
        return self._items(1)

    def _items(self, side: int) -> list[XferItem]:
        if self.regions is None:
            return []
        where = self.regions[side]
        return [
            where.run_item(layer, run.remote_start if side else run.local_start, run.length)
            for layers, runs in self.group_runs
            for layer in layers
            for run in runs
        ]


def plan_read(
    local: KVRegions,
    remote: KVRegions,
    group_layers: Sequence[Sequence[int]],
    local_ids: Sequence[Sequence[int]],
    remote_ids: Sequence[Sequence[int]],
    *,
    merge: bool = True,
) -> ReadPlan:
    """Plan reading ``remote_ids[g]`` into ``local_ids[g]`` for the layers of each group ``g``.

    Raises ``ValueError`` for mismatched lists or block ids outside either side's cache.
    """
    if local.block_len != remote.block_len or local.layer_names != remote.layer_names:
        raise ValueError("local and remote KV regions differ in block length or layers")
    if not len(group_layers) == len(local_ids) == len(remote_ids):
        raise ValueError("one list of block ids per KV cache group on both sides is required")
    runs_per_group: list[list[BlockRun]] = []
    for loc, rem in zip(local_ids, remote_ids):
        local.check_blocks(loc, "local")
        remote.check_blocks(rem, "remote")
        if len(loc) != len(rem):
            raise ValueError(f"{len(loc)} local vs {len(rem)} remote block ids in one group")
        runs_per_group.append(merge_runs(loc, rem) if merge else [])
    pairs = sum(len(layers) * len(ids) for layers, ids in zip(group_layers, local_ids))
    num_bytes = pairs * local.block_len
    nothing_merges = not merge or all(
        len(runs) == len(ids) for runs, ids in zip(runs_per_group, local_ids)
    )
    if nothing_merges or not (local.mergeable and remote.mergeable):
        li: list[int] = []
        ri: list[int] = []
        for layers, loc, rem in zip(group_layers, local_ids, remote_ids):
            for layer in layers:  # indices as ``KVRegions.index``, inlined: a READ has thousands
                lo, ro = layer * local.num_blocks, layer * remote.num_blocks
                li.extend([lo + b for b in loc])
                ri.extend([ro + b for b in rem])
        return ReadPlan(li, ri, num_bytes, pairs, len(li))
    li, ri = [], []
    for layers, runs in zip(group_layers, runs_per_group):
        for layer in layers:
            lo, ro = layer * local.num_blocks, layer * remote.num_blocks
            for run in runs:
                li.extend(range(lo + run.local_start, lo + run.local_start + run.length))
                ri.extend(range(ro + run.remote_start, ro + run.remote_start + run.length))
    group_runs = tuple(zip(group_layers, runs_per_group))
    num_descs = sum(len(layers) * len(runs) for layers, runs in group_runs)
    return ReadPlan(li, ri, num_bytes, pairs, num_descs, group_runs, (local, remote))
