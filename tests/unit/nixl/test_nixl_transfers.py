"""Contiguous-run merging and READ planning (pure functions)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbridge.nixl import transfers
from kvbridge.nixl.transfers import BlockRun, KVRegions, merge_runs, plan_read

BLOCK = 128


def regions(
    num_blocks: int = 64, layers: int = 2, base: int = 1 << 20, stride: int = BLOCK
) -> KVRegions:
    return KVRegions(
        layer_names=tuple(f"layers.{i}" for i in range(layers)),
        base_addrs=tuple(base + i * (1 << 16) for i in range(layers)),
        block_len=BLOCK,
        block_stride=stride,
        num_blocks=num_blocks,
        memory_type="DRAM",
        device_id=0,
    )


def test_merge_example_from_the_docstring() -> None:
    assert merge_runs([7, 8, 9, 3, 4], [20, 21, 22, 5, 9]) == [
        BlockRun(3, 5, 1),
        BlockRun(4, 9, 1),
        BlockRun(7, 20, 3),
    ]
    assert merge_runs([], []) == []
    with pytest.raises(ValueError, match="2 local vs 1 remote"):
        merge_runs([1, 2], [1])


pairs = st.lists(
    st.tuples(st.integers(0, 40), st.integers(0, 40)), max_size=30
) | st.builds(  # long contiguous stretches, the common case
    lambda a, b, n: [(a + i, b + i) for i in range(n)],
    st.integers(0, 10),
    st.integers(0, 10),
    st.integers(0, 20),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(pairs, max_size=4).map(lambda chunks: [p for c in chunks for p in c]))
def test_merged_runs_cover_the_pairs_exactly_and_are_maximal(
    pair_list: list[tuple[int, int]],
) -> None:
    local = [p[0] for p in pair_list]
    remote = [p[1] for p in pair_list]
    runs = merge_runs(local, remote)
    expanded = [(r.local_start + i, r.remote_start + i) for r in runs for i in range(r.length)]
    assert expanded == sorted(pair_list)
    assert all(r.length >= 1 for r in runs)
    for a, b in itertools.pairwise(runs):
        joinable = (
            b.local_start == a.local_start + a.length
            and b.remote_start == a.remote_start + a.length
        )
        assert not joinable


def test_scattered_blocks_use_the_prepared_dlists() -> None:
    local, remote = regions(), regions(num_blocks=32, base=1 << 30)
    plan = plan_read(local, remote, [[0, 1]], [[5, 9]], [[2, 7]])
    assert not plan.merged
    assert plan.local_indices.tolist() == [5, 9, 64 + 5, 64 + 9]
    assert plan.remote_indices.tolist() == [2, 7, 32 + 2, 32 + 7]
    assert plan.num_bytes == 4 * BLOCK and plan.num_descs == 4


def test_contiguous_blocks_become_one_descriptor_per_layer_and_run() -> None:
    local, remote = regions(), regions(num_blocks=32, base=1 << 30)
    plan = plan_read(local, remote, [[0, 1]], [[4, 5, 6, 9]], [[10, 11, 12, 3]])
    assert plan.merged and plan.num_descs == 4  # 2 runs x 2 layers
    assert plan.local_items[0] == (local.base_addrs[0] + 4 * BLOCK, 3 * BLOCK, 0)
    assert plan.remote_items[0] == (remote.base_addrs[0] + 10 * BLOCK, 3 * BLOCK, 0)
    assert plan.local_items[3] == (local.base_addrs[1] + 9 * BLOCK, BLOCK, 0)
    assert sum(item[1] for item in plan.local_items) == plan.num_bytes == 8 * BLOCK
    unmerged = plan_read(local, remote, [[0, 1]], [[4, 5, 6, 9]], [[10, 11, 12, 3]], merge=False)
    assert not unmerged.merged and unmerged.num_descs == 8
    assert unmerged.num_bytes == plan.num_bytes


def test_padded_blocks_are_never_merged() -> None:
    local = regions(stride=2 * BLOCK)
    plan = plan_read(local, regions(stride=2 * BLOCK), [[0]], [[1, 2]], [[1, 2]])
    assert not plan.merged and plan.num_descs == 2


def test_groups_read_only_their_own_layers() -> None:
    local, remote = regions(layers=3), regions(layers=3, base=1 << 30)
    plan = plan_read(local, remote, [[0, 2], [1]], [[1], [2]], [[3], [4]])
    assert plan.local_indices.tolist() == [1, 2 * 64 + 1, 64 + 2]
    assert plan.remote_indices.tolist() == [3, 2 * 64 + 3, 64 + 4]


def test_out_of_range_and_mismatched_plans_are_refused() -> None:
    local, remote = regions(), regions(num_blocks=8)
    with pytest.raises(ValueError, match="remote block id 8 outside 0..7"):
        plan_read(local, remote, [[0, 1]], [[1]], [[8]])
    with pytest.raises(ValueError, match="local block id 64"):
        plan_read(local, remote, [[0, 1]], [[64]], [[1]])
    with pytest.raises(ValueError, match="block length or layers"):
        plan_read(local, regions(layers=1), [[0]], [[1]], [[1]])
    with pytest.raises(ValueError, match="bad geometry"):
        regions(stride=BLOCK - 1)


def test_descending_block_ids_still_merge() -> None:
    assert merge_runs([7, 6, 5, 4], [13, 12, 11, 10]) == [BlockRun(4, 10, 4)]


def _reference_plan(
    local: KVRegions, remote: KVRegions, layers: list[int], loc: list[int], rem: list[int]
) -> tuple[list[int], list[int], int]:
    """The per-block plan, one Python step per block and layer: indices and descriptors."""
    runs = merge_runs(loc, rem)
    if len(runs) == len(loc):
        li = [local.index(layer, b) for layer in layers for b in loc]
        ri = [remote.index(layer, b) for layer in layers for b in rem]
        return li, ri, len(li)
    li, ri = [], []
    for layer in layers:
        for run in runs:
            li += [local.index(layer, run.local_start + i) for i in range(run.length)]
            ri += [remote.index(layer, run.remote_start + i) for i in range(run.length)]
    return li, ri, len(layers) * len(runs)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(pairs, max_size=4).map(lambda chunks: [p for c in chunks for p in c]),
    st.lists(st.integers(0, 2), min_size=1, max_size=3, unique=True),
)
def test_the_array_plan_matches_the_per_block_plan(
    pair_list: list[tuple[int, int]], layers: list[int]
) -> None:
    local, remote = regions(layers=3), regions(num_blocks=48, layers=3, base=1 << 30)
    loc, rem = [p[0] for p in pair_list], [p[1] for p in pair_list]
    plan = plan_read(local, remote, [layers], [loc], [rem])
    li, ri, descs = _reference_plan(local, remote, layers, loc, rem)
    assert plan.local_indices.tolist() == li and plan.remote_indices.tolist() == ri
    assert plan.num_descs == descs and plan.num_block_layers == len(li)
    assert plan.local_indices.dtype == np.int32


@settings(max_examples=300, deadline=None)
@given(
    st.lists(pairs, max_size=3).map(lambda chunks: [p for c in chunks for p in c][:40]),
    st.lists(st.integers(0, 2), min_size=1, max_size=3, unique=True),
    st.booleans(),
    st.sampled_from([BLOCK, 2 * BLOCK]),
)
def test_the_python_plan_of_a_small_read_is_the_array_plan(
    pair_list: list[tuple[int, int]], layers: list[int], merge: bool, stride: int
) -> None:
    """Up to ``SMALL_PLAN_PAIRS`` ids the plan is built in Python: the same indices, counts
    and runs as the array plan (forced by a threshold of 0), merged or not, padded or not."""
    local = regions(layers=3, stride=stride)
    remote = regions(num_blocks=48, layers=3, base=1 << 30, stride=stride)
    loc, rem = [p[0] for p in pair_list], [p[1] for p in pair_list]
    half = len(loc) // 2  # two groups, both non-empty-or-empty as it falls
    args = (local, remote, [layers, layers[:1]], [loc[:half], loc[half:]], [rem[:half], rem[half:]])
    small = plan_read(*args, merge=merge)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transfers, "SMALL_PLAN_PAIRS", 0)
        array = plan_read(*args, merge=merge)
    assert small.local_indices.tolist() == array.local_indices.tolist()
    assert small.remote_indices.tolist() == array.remote_indices.tolist()
    assert small.local_indices.dtype == array.local_indices.dtype == np.int32
    assert (small.num_bytes, small.num_block_layers, small.num_descs) == (
        array.num_bytes,
        array.num_block_layers,
        array.num_descs,
    )
    assert small.group_runs == array.group_runs and small.local_items == array.local_items


def test_both_plans_refuse_the_same_bad_ids_with_the_same_words() -> None:
    local, remote = regions(), regions(num_blocks=8)
    cases = [
        ([[3, 70, -1]], [[1, 2, 3]], "local block id 70 outside 0..63"),
        ([[1, 2]], [[9, 8]], "remote block id 9 outside 0..7"),
        ([[1, 2]], [[1]], "2 local vs 1 remote block ids in one group"),
    ]
    for threshold in (transfers.SMALL_PLAN_PAIRS, 0):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(transfers, "SMALL_PLAN_PAIRS", threshold)
            for loc, rem, words in cases:
                with pytest.raises(ValueError, match=words):
                    plan_read(local, remote, [[0, 1]], loc, rem)


def test_many_ids_or_arrays_of_ids_take_the_array_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Python plan is for a few ids given as lists; beyond, or for arrays, numpy plans."""
    calls: list[int] = []
    real = transfers._plan_small
    monkeypatch.setattr(transfers, "_plan_small", lambda *a: calls.append(1) or real(*a))
    local, remote = regions(num_blocks=256), regions(num_blocks=256, base=1 << 30)
    few = list(range(transfers.SMALL_PLAN_PAIRS))
    plan_read(local, remote, [[0, 1]], [few], [few])
    assert calls == [1]
    many = list(range(transfers.SMALL_PLAN_PAIRS + 1))
    plan = plan_read(local, remote, [[0, 1]], [many], [many])
    plan_read(local, remote, [[0, 1]], [np.arange(4)], [np.arange(4)])
    assert calls == [1] and plan.num_descs == 2
