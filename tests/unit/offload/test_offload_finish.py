"""request_finished: (False, None) and no state unless a store still reads the blocks (SPEC §5).

The finish-time flush stays, for the blocks that only the request's last step confirmed (see
``CPUOffloadScheduler._finish`` for the measurement); everything else returns (False, None).
"""

from __future__ import annotations

from offload_helpers import (
    BLOCK_SIZE,
    Driver,
    config,
    hybrid_spec,
    request,
    scheduled,
    scheduled_groups,
    spec,
)

from kvbridge.connector.base import ConnectorOutput
from kvbridge.offload.metadata import CPUOffloadMetadata, CPUOffloadWorkerMetadata
from kvbridge.offload.scheduler import CPUOffloadScheduler

BS = BLOCK_SIZE


def make(hybrid: bool = False) -> tuple[CPUOffloadScheduler, Driver]:
    sched = CPUOffloadScheduler(config(num_cpu_blocks=16), hybrid_spec() if hybrid else spec())
    return sched, Driver(sched)


def complete(drv: Driver, meta: CPUOffloadMetadata) -> ConnectorOutput:
    """One step in which every store of ``meta`` is reported done."""
    done = CPUOffloadWorkerMetadata(completed_stores=[j.job_id for j in meta.stores])
    return drv.step(worker_output=ConnectorOutput(worker_meta=done))


def assert_forgotten(sched: CPUOffloadScheduler, drv: Driver) -> None:
    sched.check_integrity()
    assert sched.num_tracked_requests == 0
    drv.step()
    meta = drv.metas[-1]
    assert meta.stores == [] and meta.report_when_done == [] and meta.loads == []


def test_a_request_whose_blocks_are_all_stored_returns_false_and_leaves_no_state() -> None:
    sched, drv = make()
    req = request("a", list(range(9)))
    drv.step(scheduled(req, [0, 1, 2], 0, 9))
    drv.step(scheduled(req, [0, 1, 2], 9, 1))  # the prompt blocks are stored here
    complete(drv, drv.metas[-1])
    req.num_computed_tokens = 10
    assert sched.request_finished(req, [0, 1, 2]) == (False, None)
    assert_forgotten(sched, drv)
    assert sched.pool.num_cached == 2


def test_a_request_with_nothing_to_store_returns_false_and_leaves_no_state() -> None:
    sched, drv = make()
    req = request("a", list(range(3)))  # no full block
    drv.step(scheduled(req, [0], 0, 3))
    req.num_computed_tokens = 3
    assert sched.request_finished(req, [0]) == (False, None)
    assert_forgotten(sched, drv)


def test_blocks_confirmed_before_the_last_step_are_stored_by_that_steps_store() -> None:
    # Chunked prefill, then the request ends (max_tokens=1): chunk one's blocks were confirmed
    # before the last step and its store covers them; the flush covers only chunk two's.
    sched, drv = make()
    req = request("a", list(range(17)))
    blocks = [0, 1, 2, 3, 4]
    drv.step(scheduled(req, blocks, 0, 8))
    drv.step(scheduled(req, blocks, 8, 9))
    assert [j.gpu_block_ids for j in drv.metas[-1].stores] == [[0, 1]]
    complete(drv, drv.metas[-1])
    req.num_computed_tokens = 17
    assert sched.request_finished(req, blocks) == (True, None)
    drv.step()
    flush = drv.metas[-1]
    assert [j.gpu_block_ids for j in flush.stores] == [[2, 3]]
    assert flush.report_when_done == ["a"]
    complete(drv, flush)
    assert sched.pool.num_cached == 4
    assert_forgotten(sched, drv)


def test_the_flush_only_runs_when_it_stores_something_new() -> None:
    sched, drv = make()
    tokens = list(range(9))
    first = request("a", tokens)
    drv.step(scheduled(first, [0, 1, 2], 0, 9))
    first.num_computed_tokens = 9
    assert sched.request_finished(first, [0, 1, 2]) == (True, None)  # control: a new flush
    drv.step()
    complete(drv, drv.metas[-1])
    assert sched.num_tracked_requests == 0
    again = request("b", tokens)  # same blocks, already on the CPU tier
    drv.step(scheduled(again, [3, 4, 5], 0, 9))
    again.num_computed_tokens = 9
    assert sched.request_finished(again, [3, 4, 5]) == (False, None)
    assert_forgotten(sched, drv)


def test_a_flush_already_in_flight_elsewhere_does_not_delay() -> None:
    sched, drv = make()
    tokens = list(range(9))
    a, b = request("a", tokens), request("b", tokens)
    drv.step(scheduled(a, [0, 1, 2], 0, 9), scheduled(b, [3, 4, 5], 0, 9))
    a.num_computed_tokens = b.num_computed_tokens = 9
    assert sched.request_finished(a, [0, 1, 2]) == (True, None)
    assert sched.request_finished(b, [3, 4, 5]) == (False, None)  # a's flush stores them
    assert sched.num_tracked_requests == 1
    drv.step()
    complete(drv, drv.metas[-1])
    assert_forgotten(sched, drv)


def test_hybrid_request_stored_in_every_group_returns_false_and_leaves_no_state() -> None:
    sched, drv = make(hybrid=True)
    req = request("a", list(range(9)))
    blocks = ([1, 2, 3], [4, 5, 6])
    drv.step(scheduled_groups(req, blocks, 0, 9))
    drv.step(scheduled_groups(req, blocks, 9, 1))
    assert {j.group for j in drv.metas[-1].stores} == {0, 1}
    complete(drv, drv.metas[-1])
    req.num_computed_tokens = 10
    assert sched.request_finished_all_groups(req, blocks) == (False, None)
    assert_forgotten(sched, drv)


def test_hybrid_flush_covers_every_group_and_skips_null_blocks() -> None:
    sched, drv = make(hybrid=True)
    req = request("a", list(range(17)))
    blocks = ([1, 2, 3, 4, 5], [0, 0, 8, 9, 10])
    drv.step(scheduled_groups(req, blocks, 0, 17))
    req.num_computed_tokens = 17
    assert sched.request_finished_all_groups(req, blocks) == (True, None)
    drv.step()
    flush = drv.metas[-1]
    assert [(j.group, j.gpu_block_ids) for j in flush.stores] == [(0, [1, 2, 3, 4]), (1, [8, 9])]
    complete(drv, flush)
    assert_forgotten(sched, drv)


def test_hybrid_request_finished_without_group_ids_flushes_nothing() -> None:
    sched, drv = make(hybrid=True)
    req = request("a", list(range(9)))
    drv.step(scheduled_groups(req, ([1, 2, 3], [4, 5, 6]), 0, 9))
    req.num_computed_tokens = 9
    assert sched.request_finished(req, [1, 2, 3]) == (False, None)  # one list: which group?
    assert_forgotten(sched, drv)
    assert sched.pool.num_storing == 0
