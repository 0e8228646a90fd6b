"""Scheduler and worker halves together on real CPU tensors, without an engine."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from offload_helpers import (
    BLOCK_SIZE,
    Driver,
    Later,
    config,
    kv_caches,
    request,
    scheduled,
    spec,
)

from kvbridge.config import TransferConfig
from kvbridge.connector.base import KVConnectorRole
from kvbridge.connector.factory import create_connector
from kvbridge.connector.stats import KVConnectorStats
from kvbridge.connector.types import SimpleRequest
from kvbridge.copy.backend import CopyHandle
from kvbridge.copy.cpu import CPUCopyBackend
from kvbridge.offload.metadata import CPUOffloadWorkerMetadata
from kvbridge.offload.scheduler import CPUOffloadScheduler
from kvbridge.offload.worker import CPUOffloadWorker

BS = BLOCK_SIZE


class Halves:
    def __init__(self, **extra: object) -> None:
        self.spec = spec(num_blocks=16)
        cfg = config(**extra)
        sched = create_connector(cfg, KVConnectorRole.SCHEDULER, self.spec)
        worker = create_connector(cfg, KVConnectorRole.WORKER, self.spec)
        assert isinstance(sched, CPUOffloadScheduler) and isinstance(worker, CPUOffloadWorker)
        self.sched, self.worker = sched, worker
        self.caches = kv_caches(self.spec, seed=3)
        self.worker.register_kv_caches(self.caches)
        self.drv = Driver(self.sched, self.worker)

    def snapshot(self, blocks: list[int]) -> list[torch.Tensor]:
        return [t[blocks].clone() for t in self.caches.values()]

    def scramble(self) -> None:
        for t in self.caches.values():
            t.normal_()

    def prefill_and_store(self, req: SimpleRequest, blocks: list[int]) -> None:
        n = req.num_prompt_tokens
        self.drv.step(scheduled(req, blocks, 0, n))
        out = self.drv.step(scheduled(req, blocks, n, 1))  # prompt confirmed: stored now
        assert isinstance(out.worker_meta, CPUOffloadWorkerMetadata)
        assert out.worker_meta.completed_stores
        req.num_computed_tokens = n + 1
        assert self.sched.request_finished(req, blocks) == (False, None)

    def match_and_alloc(self, req: SimpleRequest, blocks: list[int], expect: int) -> None:
        assert self.sched.get_num_new_matched_tokens(req, 0) == (expect, True)
        self.sched.update_state_after_alloc(req, (blocks,), expect)


def test_store_overwrite_load_gives_back_the_same_bytes() -> None:
    h = Halves()
    a = request("a", list(range(13)))  # 3 full blocks
    h.prefill_and_store(a, [3, 4, 5, 6])
    expected = h.snapshot([3, 4, 5])
    h.scramble()
    b = request("b", [*range(13), 7])
    h.match_and_alloc(b, [8, 9, 10, 11], 3 * BS)
    out = h.drv.step()
    assert out.finished_recving == {"b"} and out.invalid_block_ids == set()
    for got, want in zip(h.snapshot([8, 9, 10]), expected):
        assert torch.equal(got, want)
    assert h.sched.pool.num_pins == 0
    assert isinstance(out.stats, KVConnectorStats)
    assert out.stats.data["cpu_to_gpu_bytes"] == 3 * h.spec.block_bytes


def test_finish_flush_keeps_blocks_until_finished_sending() -> None:
    h = Halves()
    a = request("a", list(range(9)))
    h.drv.step(scheduled(a, [0, 1, 2], 0, 9))
    a.num_computed_tokens = 9
    expected = h.snapshot([0, 1])
    assert h.sched.request_finished(a, [0, 1, 2]) == (True, None)
    out = h.drv.step()
    assert out.finished_sending == {"a"}
    h.scramble()
    b = request("b", list(range(9)))
    h.match_and_alloc(b, [5, 6, 7], 2 * BS)
    assert h.drv.step().finished_recving == {"b"}
    for got, want in zip(h.snapshot([5, 6]), expected):
        assert torch.equal(got, want)


class SlowBackend(CPUCopyBackend):
    polls = 2

    def store(self, gpu_ids: Sequence[int], cpu_ids: Sequence[int]) -> CopyHandle:
        super().store(gpu_ids, cpu_ids)
        return Later(self.polls)

    def load(self, cpu_ids: Sequence[int], gpu_ids: Sequence[int]) -> CopyHandle:
        super().load(cpu_ids, gpu_ids)
        return Later(self.polls)


def _slow(h: Halves) -> None:
    assert h.worker.backend is not None
    h.worker.backend = SlowBackend(h.worker.backend.gpu_layers, h.worker.backend.cpu_layers)


def test_async_load_reports_only_when_done() -> None:
    h = Halves()
    h.prefill_and_store(request("a", list(range(9))), [0, 1, 2])
    _slow(h)
    b = request("b", list(range(9)))
    h.match_and_alloc(b, [5, 6, 7], 2 * BS)
    seen = [h.drv.step().finished_recving for _ in range(4)]
    assert seen == [frozenset(), frozenset(), {"b"}, frozenset()]
    assert h.sched.pool.num_pins == 0


def test_abort_during_async_load_reports_recving_and_releases_pins() -> None:
    # The engine keeps an aborted request's blocks until finished_recving: no delay_free.
    h = Halves()
    h.prefill_and_store(request("a", list(range(9))), [0, 1, 2])
    _slow(h)
    b = request("b", list(range(9)))
    h.match_and_alloc(b, [5, 6, 7], 2 * BS)
    h.drv.step()  # load launched, still in flight
    assert h.sched.request_finished(b, [5, 6, 7]) == (False, None)
    assert h.sched.pool.num_pins == 2
    outs = [h.drv.step() for _ in range(3)]
    assert [o.finished_recving for o in outs] == [frozenset(), {"b"}, frozenset()]
    assert all(not o.finished_sending for o in outs)
    assert h.sched.pool.num_pins == 0 and h.worker.num_inflight_jobs == 0
    assert not h.sched._requests


def test_in_flight_store_delays_free_of_a_finished_request() -> None:
    h = Halves()
    _slow(h)
    a = request("a", list(range(9)))
    h.drv.step(scheduled(a, [0, 1, 2], 0, 9))
    h.drv.step(scheduled(a, [0, 1, 2], 9, 1))  # store launched, in flight
    a.num_computed_tokens = 10
    assert h.sched.request_finished(a, [0, 1, 2]) == (True, None)
    sending = [h.drv.step().finished_sending for _ in range(3)]
    assert sending == [frozenset(), {"a"}, frozenset()]
    assert h.sched.pool.num_cached == 2


class FailingLoads(CPUCopyBackend):
    def load(self, cpu_ids: Sequence[int], gpu_ids: Sequence[int]) -> CopyHandle:
        raise RuntimeError("injected copy failure")


def test_failed_load_reports_block_errors_and_finishes_the_request() -> None:
    h = Halves()
    h.prefill_and_store(request("a", list(range(9))), [0, 1, 2])
    assert h.worker.backend is not None
    h.worker.backend = FailingLoads(h.worker.backend.gpu_layers, h.worker.backend.cpu_layers)
    b = request("b", list(range(9)))
    h.match_and_alloc(b, [5, 6, 7], 2 * BS)
    out = h.drv.step()
    assert out.finished_recving == {"b"} and out.invalid_block_ids == {5, 6}
    assert h.worker.take_failed_recving() == {"b"}  # by id too (hybrid caches), once
    assert h.worker.take_failed_recving() == set()
    assert h.sched.pool.num_pins == 0 and h.sched.pool.num_cached == 2


def test_worker_rejects_caches_that_do_not_match_the_spec() -> None:
    s = spec(num_blocks=16)
    worker = CPUOffloadWorker(config(), s)
    bad = {"layers.0": torch.zeros(16, 2, BS, 2, 4)}
    with pytest.raises(ValueError, match="layers.0"):
        worker.register_kv_caches(bad)
    worker.shutdown()
    worker.shutdown()


def test_worker_shutdown_waits_for_in_flight_copies() -> None:
    h = Halves()
    _slow(h)
    a = request("a", list(range(9)))
    h.drv.step(scheduled(a, [0, 1, 2], 0, 9))
    h.drv.step(scheduled(a, [0, 1, 2], 9, 1))
    assert h.worker.num_inflight_jobs == 1
    h.worker.shutdown()
    assert h.worker.num_inflight_jobs == 0 and h.worker.backend is None


def test_round_trip_as_a_multiconnector_child() -> None:
    s = spec(num_blocks=16)
    cfg = TransferConfig.from_dict(
        {
            "kv_connector": "MultiConnector",
            "kv_connector_extra_config": {
                "connectors": [
                    {"kv_connector": "NoOpConnector"},
                    {
                        "kv_connector": "SimpleCPUOffloadConnector",
                        "kv_connector_extra_config": {"num_cpu_blocks": 8},
                    },
                ]
            },
        }
    )
    sched = create_connector(cfg, KVConnectorRole.SCHEDULER, s)
    worker = create_connector(cfg, KVConnectorRole.WORKER, s)
    offload = sched.children[1]  # type: ignore[attr-defined]
    assert isinstance(offload, CPUOffloadScheduler)
    caches = kv_caches(s, seed=5)
    worker.register_kv_caches(caches)
    drv = Driver(sched, worker, check=offload.check_integrity)
    a = request("a", list(range(9)))
    drv.step(scheduled(a, [0, 1, 2], 0, 9))
    drv.step(scheduled(a, [0, 1, 2], 9, 1))
    expected = [t[[0, 1]].clone() for t in caches.values()]
    a.num_computed_tokens = 10
    assert sched.request_finished(a, [0, 1, 2]) == (False, None)
    for t in caches.values():
        t.zero_()
    b = request("b", list(range(9)))
    assert sched.get_num_new_matched_tokens(b, 0) == (2 * BS, True)
    sched.update_state_after_alloc(b, ([6, 7, 8],), 2 * BS)
    assert drv.step().finished_recving == {"b"}
    for t, want in zip(caches.values(), expected):
        assert torch.equal(t[[6, 7]], want)
    worker.shutdown()
