"""What the recompute guard's tests share: a hand-moved clock and a tiered scheduler/worker pair
on a disk directory (a fresh pair on the same directory is a restarted server)."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

from offload_helpers import BLOCK_SIZE, Driver, config, kv_caches, request, scheduled, spec

from kvbridge.connector.base import KVConnectorRole
from kvbridge.connector.factory import create_connector
from kvbridge.connector.types import SimpleRequest
from kvbridge.offload.disk.guard import RecomputeGuard
from kvbridge.offload.disk.halves import TieredOffloadScheduler, TieredOffloadWorker

A, C = list(range(21)), list(range(100, 121))  # 5 full blocks and one token each


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def timed_step(guard: RecomputeGuard, clock: Clock, tokens: int, seconds: float) -> None:
    guard.step_started(tokens)
    clock.advance(seconds)
    guard.step_ended()


class Pair:
    """A scheduler/worker pair on ``root`` whose guard runs on ``clock``; a fresh one is a
    restart (empty GPU cache and CPU tier, the records and ``guard_rates.json`` on disk).

    The guard is the one the scheduler built (seeded from the directory's rates file), put on
    ``clock``. With ``disk_tick_s`` the worker times its I/O on a clock that moves that much
    each time it is read (once per submitted batch and once per ended block), so a batch takes
    a whole number of ticks however fast the real disk is.
    """

    def __init__(self, root: Path, clock: Clock, disk_tick_s: float | None = None) -> None:
        cfg = config(
            num_cpu_blocks=16, kv_offload_backend="disk", disk_path=str(root),
            disk_capacity_bytes=1 << 30, n_read_threads=2, n_write_threads=2,
        )  # fmt: skip
        sched = create_connector(cfg, KVConnectorRole.SCHEDULER, spec())
        worker = create_connector(cfg, KVConnectorRole.WORKER, spec())
        assert isinstance(sched, TieredOffloadScheduler)
        assert isinstance(worker, TieredOffloadWorker)
        guard = sched.disk.guard
        assert guard is not None  # on by default
        guard.clock = clock  # it reads no clock before the first step or lookup
        guard.min_step_tokens = BLOCK_SIZE
        self.guard = guard
        self.sched, self.worker, self.clock = sched, worker, clock
        worker.register_kv_caches(kv_caches(spec()))
        if disk_tick_s is not None:
            assert worker.disk is not None
            ticks = itertools.count()  # next() is atomic: the I/O threads read it too
            worker.disk.clock = lambda: next(ticks) * disk_tick_s
        self.drv = Driver(sched, worker, wire=True)

    def compute(self, req: SimpleRequest, blocks: list[int], seconds: float) -> None:
        """A step that prefills ``req`` and takes ``seconds`` on the guard's clock."""
        n = len(req.prompt_token_ids)
        self.drv.step(scheduled(req, blocks, 0, n), forward=lambda: self.clock.advance(seconds))

    def store_a_and_c(self) -> None:
        """Prefill and finish prompts A and C; their blocks are then written to disk."""
        for i, tokens in enumerate((A, C)):
            req = request(f"w{i}", tokens)
            blocks = list(range(1 + 6 * i, 7 + 6 * i))
            self.drv.step(scheduled(req, blocks, 0, 21))
            self.drv.step(scheduled(req, blocks, 21, 1))
            req.num_computed_tokens = 22
            assert self.sched.request_finished(req, blocks) == (False, None)
        self.settle()

    def settle(self) -> None:
        deadline = time.monotonic() + 30
        while self.sched.disk.gauges()["kv_offload_disk_inflight_blocks"]:
            assert time.monotonic() < deadline, "disk I/O still in flight"
            self.drv.step()
            time.sleep(0.001)

    def shutdown(self) -> None:
        """Worker first (its writes end), then the scheduler (it saves the guard's rates)."""
        self.worker.shutdown()
        self.sched.shutdown()
