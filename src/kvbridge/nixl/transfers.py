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
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from kvbridge.nixl.transport import XferItem


class BlockRun(NamedTuple):
    """``length`` blocks from ``local_start`` and ``remote_start`` on, consecutive on both sides."""

    local_start: int
    remote_start: int
    length: int


BlockIds = Sequence[int] | npt.NDArray[np.integer]
# up to this many block ids (all groups) a READ is planned in Python: numpy's ~30 calls cost
# 25-40 us warm and 70-110 us inside a worker step (cold) at 16 ids x 8 layers, the Python
# plan 12-18 us warm (45-70 us in a step); they break even near 100 ids
SMALL_PLAN_PAIRS = 64


def _ids(ids: BlockIds) -> npt.NDArray[np.int64]:
    return np.asarray(ids, dtype=np.int64).reshape(-1)


def _sorted_runs(
    local: npt.NDArray[np.int64], remote: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.intp]]:
    """The pairs sorted by local id (then remote), and where each maximal run starts."""
    order = np.lexsort((remote, local))
    local, remote = local[order], remote[order]
    breaks = (np.diff(local) != 1) | (np.diff(remote) != 1)
    starts = np.flatnonzero(np.concatenate(([local.size > 0], breaks)))
    return local, remote, starts


def merge_runs(local: Sequence[int], remote: Sequence[int]) -> list[BlockRun]:
    """Group the pairs ``(local[i], remote[i])`` into maximal runs contiguous on both sides.

    Pairs are merged in local-id order (a READ may move them in any order), so block ids that
    an allocator handed out in descending order still merge.
    """
    if len(local) != len(remote):
        raise ValueError(f"merge_runs: {len(local)} local vs {len(remote)} remote block ids")
    loc, rem, starts = _sorted_runs(_ids(local), _ids(remote))
    lengths = np.diff(np.append(starts, loc.size))
    return [
        BlockRun(int(a), int(b), int(n))
        for a, b, n in zip(loc[starts], rem[starts], lengths, strict=True)
    ]


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

    def check_blocks(self, block_ids: BlockIds, side: str) -> None:
        ids = _ids(block_ids)
        bad = ids[(ids < 0) | (ids >= self.num_blocks)]
        if bad.size:
            raise ValueError(f"{side} block id {int(bad[0])} outside 0..{self.num_blocks - 1}")


class GroupRuns(NamedTuple):
    """A KV cache group's runs (arrays of ``BlockRun``'s fields) and the layers read."""

    layers: tuple[int, ...]
    local_starts: npt.NDArray[np.int64]
    remote_starts: npt.NDArray[np.int64]
    lengths: npt.NDArray[np.int64]


@dataclass(frozen=True)
class ReadPlan:
    """One READ: indices into the per-block dlists prepared once per remote, in run order.

    The indices are int32 arrays (NIXL takes them without a per-index conversion). ``merged``
    plans order them so that each run of blocks contiguous on both sides is consecutive (NIXL
    joins consecutive adjacent descriptors into one). The joined descriptors themselves
    (``local_items``/``remote_items``, one per layer and run) are built only on demand: the
    READ does not need them, a baseline that prepares them does.
    """

    local_indices: npt.NDArray[np.int32]
    remote_indices: npt.NDArray[np.int32]
    num_bytes: int
    num_block_layers: int  # (block, layer) pairs moved
    num_descs: int  # descriptors once NIXL joins the runs (one per block and layer if none)
    runs: tuple[GroupRuns, ...] = ()  # merged: per group
    regions: tuple[KVRegions, KVRegions] | None = field(default=None, repr=False)

    @property
    def merged(self) -> bool:
        return bool(self.runs)

    @property
    def group_runs(self) -> tuple[tuple[tuple[int, ...], list[BlockRun]], ...]:
        """Per group, its layers and its runs as ``BlockRun`` tuples."""
        return tuple(
            (g.layers, [BlockRun(int(a), int(b), int(n)) for a, b, n in zip(*g[1:], strict=True)])
            for g in self.runs
        )

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


def _layer_major(
    layers: npt.NDArray[np.int64], num_blocks: int, ids: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """Dlist indices of ``ids`` in each of ``layers``, layer by layer (``KVRegions.index``)."""
    return (layers[:, None] * num_blocks + ids[None, :]).reshape(-1)


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

    A fixed number of array operations per group: no Python work per block or per layer;
    up to ``SMALL_PLAN_PAIRS`` block ids (lists), Python steps per block instead (``_plan_small``:
    the same plan, in a third of the time). Raises ``ValueError`` for mismatched lists or block
    ids outside either side's cache.
    """
    if local.block_len != remote.block_len or local.layer_names != remote.layer_names:
        raise ValueError("local and remote KV regions differ in block length or layers")
    if not len(group_layers) == len(local_ids) == len(remote_ids):
        raise ValueError("one list of block ids per KV cache group on both sides is required")
    if few_ids(local_ids) and few_ids(remote_ids):
        return _plan_small(local, remote, group_layers, local_ids, remote_ids, merge)
    groups = []  # (layers, local ids, remote ids, sorted local, sorted remote, run starts)
    for layer_list, loc_list, rem_list in zip(group_layers, local_ids, remote_ids):
        loc, rem = _ids(loc_list), _ids(rem_list)
        local.check_blocks(loc, "local")
        remote.check_blocks(rem, "remote")
        if loc.size != rem.size:
            raise ValueError(f"{loc.size} local vs {rem.size} remote block ids in one group")
        layers = np.asarray(layer_list, dtype=np.int64).reshape(-1)
        groups.append((layers, loc, rem, *_sorted_runs(loc, rem)))
    pairs = sum(g[0].size * g[1].size for g in groups)
    nothing_merges = not merge or all(g[5].size == g[1].size for g in groups)
    if nothing_merges or not (local.mergeable and remote.mergeable):
        li = [_layer_major(g[0], local.num_blocks, g[1]) for g in groups]
        ri = [_layer_major(g[0], remote.num_blocks, g[2]) for g in groups]
        return ReadPlan(_indices(li), _indices(ri), pairs * local.block_len, pairs, pairs)
    li = [_layer_major(g[0], local.num_blocks, g[3]) for g in groups]
    ri = [_layer_major(g[0], remote.num_blocks, g[4]) for g in groups]
    runs = tuple(
        GroupRuns(
            tuple(int(x) for x in layers),
            sorted_loc[starts],
            sorted_rem[starts],
            np.diff(np.append(starts, sorted_loc.size)),
        )
        for layers, _, _, sorted_loc, sorted_rem, starts in groups
    )
    num_descs = sum(len(g.layers) * g.lengths.size for g in runs)
    return ReadPlan(
        _indices(li), _indices(ri), pairs * local.block_len, pairs, num_descs, runs, (local, remote)
    )


def few_ids(ids: Sequence[Sequence[int]]) -> bool:
    """Few enough block ids (``SMALL_PLAN_PAIRS``), as lists or tuples, for ``_plan_small``
    (and for ``PlanCache`` to keep the plan)."""
    total = 0
    for group in ids:
        if not isinstance(group, list | tuple):
            return False
        total += len(group)
    return total <= SMALL_PLAN_PAIRS


def _checked(ids: Sequence[int], where: KVRegions, side: str) -> list[int]:
    out = [int(b) for b in ids]
    if out and (min(out) < 0 or max(out) >= where.num_blocks):
        bad = next(b for b in out if not 0 <= b < where.num_blocks)
        raise ValueError(f"{side} block id {bad} outside 0..{where.num_blocks - 1}")
    return out


def _plan_small(
    local: KVRegions,
    remote: KVRegions,
    group_layers: Sequence[Sequence[int]],
    local_ids: Sequence[Sequence[int]],
    remote_ids: Sequence[Sequence[int]],
    merge: bool,
) -> ReadPlan:
    """``plan_read`` for a few block ids: sorting and runs in Python, the indices by one
    broadcast per group and side (numpy's fixed cost per call outweighs the work here)."""
    groups = []  # (layers, local ids, remote ids, pairs sorted, run starts)
    for layer_list, loc_list, rem_list in zip(group_layers, local_ids, remote_ids):
        loc = _checked(loc_list, local, "local")
        rem = _checked(rem_list, remote, "remote")
        if len(loc) != len(rem):
            raise ValueError(f"{len(loc)} local vs {len(rem)} remote block ids in one group")
        pairs = sorted(zip(loc, rem))
        starts = [
            i
            for i, (a, b) in enumerate(pairs)
            if not i or a != pairs[i - 1][0] + 1 or b != pairs[i - 1][1] + 1
        ]
        layers = np.asarray(layer_list, dtype=np.int32).reshape(-1)
        groups.append((layers, loc, rem, pairs, starts))
    num_pairs = sum(g[0].size * len(g[1]) for g in groups)
    nothing_merges = not merge or all(len(g[4]) == len(g[1]) for g in groups)
    merged = not nothing_merges and local.mergeable and remote.mergeable
    li, ri, runs = [], [], []
    for layers, loc, rem, pairs, starts in groups:
        if merged:
            loc, rem = [a for a, _ in pairs], [b for _, b in pairs]
            ends = [*starts[1:], len(pairs)]
            runs.append(
                GroupRuns(
                    tuple(int(x) for x in layers),
                    np.array([pairs[i][0] for i in starts], dtype=np.int64),
                    np.array([pairs[i][1] for i in starts], dtype=np.int64),
                    np.array([e - i for i, e in zip(starts, ends)], dtype=np.int64),
                )
            )
        li.append(np.add.outer(layers * local.num_blocks, np.array(loc, dtype=np.int32)))
        ri.append(np.add.outer(layers * remote.num_blocks, np.array(rem, dtype=np.int32)))
    nbytes = num_pairs * local.block_len
    if not merged:
        return ReadPlan(_indices(li), _indices(ri), nbytes, num_pairs, num_pairs)
    num_descs = sum(len(g.layers) * g.lengths.size for g in runs)
    return ReadPlan(
        _indices(li), _indices(ri), nbytes, num_pairs, num_descs, tuple(runs), (local, remote)
    )


def _indices(parts: Sequence[npt.NDArray[np.integer[Any]]]) -> npt.NDArray[np.int32]:
    if not parts:
        return np.empty(0, dtype=np.int32)
    if len(parts) == 1:
        return parts[0].reshape(-1).astype(np.int32, copy=False)
    return np.concatenate([p.reshape(-1) for p in parts]).astype(np.int32, copy=False)
