"""CPUOffloadScheduler on a hybrid cache (full attention + sliding window): one test per rule."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import pytest
from offload_helpers import (
    BLOCK_SIZE,
    HYBRID_GROUPS,
    Driver,
    config,
    hybrid_spec,
    request,
    scheduled_groups,
)

from kvbridge.connector.base import ConnectorOutput, KVConnectorRole
from kvbridge.connector.factory import create_connector
from kvbridge.connector.types import BlockStored, KVCacheGroupSpec, Medium
from kvbridge.offload.connector import SimpleCPUOffloadConnector
from kvbridge.offload.groups import HitRule
from kvbridge.offload.metadata import CPUOffloadWorkerMetadata
from kvbridge.offload.pool import CPUBlockPool
from kvbridge.offload.scheduler import CPUOffloadScheduler

BS = BLOCK_SIZE
FULL, SWA = 0, 1
TOKENS = list(range(21))  # 5 full blocks and one token: a hit covers at most blocks 0..4


def make(**extra: object) -> tuple[CPUOffloadScheduler, Driver]:
    extra.setdefault("num_cpu_blocks", 16)
    sched = CPUOffloadScheduler(config(**extra), hybrid_spec())
    return sched, Driver(sched)


def put(sched: CPUOffloadScheduler, tokens: list[int], group: int, positions: list[int]) -> None:
    """Put the blocks at ``positions`` of ``group`` on the CPU tier (as finished stores)."""
    hashes = request("x", tokens).block_hashes
    plan = sched.pool.prepare_store([hashes[i] for i in positions], group)
    sched.pool.complete_store(plan.block_ids, success=True)
    sched.pool.take_events()


def pinned_positions(sched: CPUOffloadScheduler, req_id: str) -> list[list[int]]:
    match = sched._requests[req_id].match
    assert match is not None
    return [sorted(group) for group in match.pinned]


def test_rule_window_is_the_blocks_read_by_the_token_after_the_hit() -> None:
    rule = HitRule([None, 9, 8, 1], BS)
    assert rule.window_blocks == [None, 2, 2, 0]  # ceil((W - 1) / block_size)
    assert list(rule.needed(0, 1, 5)) == [1, 2, 3, 4]
    assert list(rule.needed(1, 1, 5)) == [3, 4]
    assert list(rule.needed(1, 1, 2)) == [1]  # the engine holds what precedes its prefix
    assert list(rule.needed(3, 0, 5)) == []
    assert rule.is_null(1, 0) and not rule.is_null(0, 0)


def test_connector_declares_hma_and_builds_on_a_hybrid_cache() -> None:
    assert SimpleCPUOffloadConnector.supports_hma()
    for role in KVConnectorRole:
        create_connector(config(), role, hybrid_spec()).shutdown()


def test_same_tokens_in_two_groups_are_two_pool_entries() -> None:
    pool = CPUBlockPool(4, BS, num_groups=2)
    plan = pool.prepare_store([b"h"], FULL)
    pool.complete_store(plan.block_ids, success=True)
    assert pool.is_cached(b"h", FULL) and not pool.is_cached(b"h", SWA)
    assert pool.lookup([b"h"], SWA) == 0
    again = pool.prepare_store([b"h"], SWA)
    assert again.num_cached == 0 and again.block_ids != plan.block_ids
    pool.complete_store(again.block_ids, success=True)
    assert pool.take_events() == [
        BlockStored((b"h",), Medium.CPU, BS, FULL),
        BlockStored((b"h",), Medium.CPU, BS, SWA),
    ]
    pool.check_integrity()


def test_stores_are_one_job_per_group_carrying_its_index() -> None:
    sched, drv = make()
    req = request("a", TOKENS[:9])  # 2 full blocks
    blocks = ([5, 6, 7], [8, 9, 10])
    drv.step(scheduled_groups(req, blocks, 0, 9))
    drv.step(scheduled_groups(req, blocks, 9, 1))
    jobs = drv.metas[-1].stores
    assert [(j.group, j.gpu_block_ids) for j in jobs] == [(FULL, [5, 6]), (SWA, [8, 9])]
    drv.step(worker_output=ConnectorOutput(worker_meta=_done(j.job_id for j in jobs)))
    assert all(sched.pool.is_cached(h, g) for h in req.block_hashes for g in (FULL, SWA))
    stats = sched.get_kv_connector_stats()
    assert stats is not None  # a full block moves 2 layers, a window block 1
    assert stats.data["stored_bytes"] == 2 * (2 + 1) * hybrid_spec().block_bytes_per_layer


def test_null_blocks_of_the_sliding_window_are_never_stored() -> None:
    sched, drv = make()
    req = request("a", TOKENS[:17])  # 4 full blocks; blocks 0 and 1 left the window
    blocks = ([1, 2, 3, 4, 5], [0, 0, 9, 10, 11])
    drv.step(scheduled_groups(req, blocks, 0, 17))
    drv.step(scheduled_groups(req, blocks, 17, 1))
    jobs = {j.group: j.gpu_block_ids for j in drv.metas[-1].stores}
    assert jobs == {FULL: [1, 2, 3, 4], SWA: [9, 10]}
    assert sched.pool.num_storing == 6


def test_a_hit_needs_every_full_block_after_the_local_prefix() -> None:
    sched, _ = make()
    put(sched, TOKENS, SWA, [0, 1, 2, 3, 4])
    put(sched, TOKENS, FULL, [0, 1, 3, 4])  # block 2 missing
    assert sched.get_num_new_matched_tokens(request("b", TOKENS), 0) == (2 * BS, True)
    put(sched, TOKENS, FULL, [2])
    assert sched.get_num_new_matched_tokens(request("c", TOKENS), 0) == (5 * BS, True)
    sched.check_integrity()


def test_the_window_needs_only_its_blocks_before_the_hit_end() -> None:
    sched, _ = make()
    put(sched, TOKENS, FULL, [0, 1, 2, 3, 4])
    put(sched, TOKENS, SWA, [3, 4])  # blocks 0..2 were never stored (left the window)
    assert sched.get_num_new_matched_tokens(request("b", TOKENS), 0) == (5 * BS, True)
    assert pinned_positions(sched, "b") == [[0, 1, 2, 3, 4], [3, 4]]
    sched.check_integrity()


def test_a_hole_in_the_window_shortens_the_hit() -> None:
    sched, _ = make()
    put(sched, TOKENS, FULL, [0, 1, 2, 3, 4])
    put(sched, TOKENS, SWA, [1, 2, 3])  # block 4 missing: a hit ending at 4 uses [2, 3]
    assert sched.get_num_new_matched_tokens(request("b", TOKENS), 0) == (4 * BS, True)
    assert pinned_positions(sched, "b") == [[0, 1, 2, 3], [2, 3]]
    # after a local prefix of 3 blocks the engine holds the window before block 3: a hit to
    # block 4 needs window block 3 only (cached), a hit to 5 needs block 4 (missing)
    assert sched.get_num_new_matched_tokens(request("c", TOKENS), 3 * BS) == (BS, True)
    sched.check_integrity()


def test_load_jobs_are_per_group_and_skip_the_null_block() -> None:
    sched, drv = make()
    put(sched, TOKENS, FULL, [0, 1, 2, 3, 4])
    put(sched, TOKENS, SWA, [2, 3, 4])
    req = request("b", TOKENS)
    assert sched.get_num_new_matched_tokens(req, 0) == (5 * BS, True)
    # the engine already nulled window block 3 as well: it is not loaded, its pin released
    sched.update_state_after_alloc(req, ([1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 8, 9]), 5 * BS)
    drv.step()
    loads = {j.group: j for j in drv.metas[-1].loads}
    assert loads[FULL].gpu_block_ids == [1, 2, 3, 4, 5]
    assert loads[SWA].gpu_block_ids == [8]
    hashes = req.block_hashes
    assert loads[SWA].cpu_block_ids == [sched.pool.cached_block_id(hashes[4], SWA)]
    assert sched.pool.num_pins == 6


def test_fewer_tokens_than_matched_move_the_window() -> None:
    sched, drv = make()
    put(sched, TOKENS, FULL, [0, 1, 2, 3, 4])
    put(sched, TOKENS, SWA, [0, 1, 2, 3, 4])
    req = request("b", TOKENS)
    assert sched.get_num_new_matched_tokens(req, 0) == (5 * BS, True)
    sched.update_state_after_alloc(req, ([1, 2, 3, 4, 5, 6], [0, 7, 8, 9, 10, 11]), 3 * BS)
    drv.step()  # checks that the pins of blocks 3 and 4 went back
    loads = {j.group: j.gpu_block_ids for j in drv.metas[-1].loads}
    assert loads == {FULL: [1, 2, 3], SWA: [7, 8]}
    assert sched.pool.num_pins == 5


def test_a_shorter_hit_whose_window_is_gone_is_refused_without_leaking() -> None:
    sched, _ = make()
    put(sched, TOKENS, FULL, [0, 1, 2, 3, 4])
    put(sched, TOKENS, SWA, [3, 4])
    req = request("b", TOKENS)
    sched.get_num_new_matched_tokens(req, 0)
    with pytest.raises(RuntimeError, match="needs block 1 of group 1"):
        sched.update_state_after_alloc(req, ([1, 2, 3, 4, 5, 6], [0, 7, 8, 9, 10, 11]), 3 * BS)
    sched.check_integrity()
    sched.request_finished_all_groups(req, ([], []))
    assert sched.pool.num_pins == 0 and sched.num_tracked_requests == 0


def test_window_of_one_token_needs_no_window_block() -> None:
    one = KVCacheGroupSpec("swa", ("layers.1",), "sliding_window", 1)
    s = dataclasses.replace(hybrid_spec(), groups=(HYBRID_GROUPS[0], one))
    sched = CPUOffloadScheduler(config(num_cpu_blocks=16), s)
    put(sched, TOKENS, FULL, [0, 1, 2, 3, 4])
    assert sched.get_num_new_matched_tokens(request("b", TOKENS), 0) == (5 * BS, True)
    assert pinned_positions(sched, "b") == [[0, 1, 2, 3, 4], []]


def _done(job_ids: Iterable[int]) -> CPUOffloadWorkerMetadata:
    return CPUOffloadWorkerMetadata(completed_stores=list(job_ids))
