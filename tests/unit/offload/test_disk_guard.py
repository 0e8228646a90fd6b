"""The disk tier's recompute guard: its rate estimates on an injected clock, its decisions, and
DiskTier / the tiered halves skipping a disk hit that recomputing would beat (and counting it)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
from offload_helpers import BLOCK_SIZE, Driver, config, kv_caches, request, scheduled, spec
from prometheus_client.parser import text_string_to_metric_families

from kvbridge.config import ConfigError
from kvbridge.connector.base import KVConnectorRole
from kvbridge.connector.factory import create_connector
from kvbridge.connector.stats import KVConnectorStats
from kvbridge.connector.types import SimpleRequest
from kvbridge.offload.disk.config import DiskConfig, check_disk_extra
from kvbridge.offload.disk.guard import RateEstimate, RecomputeGuard
from kvbridge.offload.disk.halves import TieredOffloadScheduler, TieredOffloadWorker
from kvbridge.offload.disk.metadata import DiskDone, ReadBatch
from kvbridge.offload.disk.tier import DiskTier
from kvbridge.offload.groups import HitRule
from kvbridge.offload.pool import CPUBlockPool
from kvbridge.serve.metrics import ServerMetrics

H = [bytes([i]) * 16 for i in range(8)]
MB = 1_000_000


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


# -- estimates -------------------------------------------------------------------------------
def test_rate_estimate_is_an_ewma_of_log_rates() -> None:
    est = RateEstimate(alpha=0.2)
    assert est.rate is None and est.seconds_for(10) is None
    est.add(100, 1.0)
    assert est.rate == pytest.approx(100)
    est.add(1000, 1.0)  # 10x faster: the estimate moves 10 ** 0.2 = 1.585x, not 10x
    assert est.rate == pytest.approx(100 * 10**0.2)
    est.add(50, 0.0)  # no time: nothing learnt
    est.add(0, 1.0)  # nothing read: nothing learnt
    assert est.samples == 2 and est.rate == pytest.approx(100 * 10**0.2)
    assert est.seconds_for(158.489) == pytest.approx(1.0, rel=1e-4)
    for _ in range(60):  # a lasting change is followed
        est.add(10, 1.0)
    assert est.rate == pytest.approx(10, rel=1e-4)


def test_recompute_rate_times_each_big_step_from_build_to_output() -> None:
    clock = Clock()
    guard = RecomputeGuard(clock=clock, min_step_tokens=256)
    timed_step(guard, clock, 512, 0.5)  # 1,024 tokens/s
    assert guard.recompute.rate == pytest.approx(1024)
    clock.advance(30)  # idle between steps: not compute time
    timed_step(guard, clock, 4096, 2.0)  # 2,048 tokens/s
    want = math.exp(0.8 * math.log(1024) + 0.2 * math.log(2048))  # geometric, alpha 0.2
    assert guard.recompute.rate == pytest.approx(want)
    for tokens in (1, 8, 255):  # decode-sized steps: bound by weight reads, never a sample
        timed_step(guard, clock, tokens, 1.0)
    assert guard.recompute.samples == 2


def test_with_async_scheduling_a_step_starts_when_the_one_before_ended() -> None:
    """vLLM's async scheduling builds step N+1 while N runs: N+1's time starts at N's end."""
    clock = Clock()
    guard = RecomputeGuard(clock=clock, min_step_tokens=256)
    guard.step_started(1000)  # step 1 built
    clock.advance(0.1)
    guard.step_started(2000)  # step 2 built while step 1 runs
    clock.advance(0.4)
    guard.step_ended()  # step 1: 1,000 tokens in 0.5 s
    assert guard.recompute.rate == pytest.approx(2000)
    clock.advance(0.5)
    guard.step_ended()  # step 2 ran 0.5 s after step 1 ended (not 0.9 s after it was built)
    want = math.exp(0.8 * math.log(2000) + 0.2 * math.log(4000))
    assert guard.recompute.rate == pytest.approx(want)
    guard.step_ended()  # an output without a step built: nothing to time
    assert guard.recompute.samples == 2


def test_the_disk_is_read_until_both_rates_are_measured() -> None:
    clock = Clock()
    guard = RecomputeGuard(clock=clock, min_step_tokens=16)
    assert guard.decide(1 << 30, 16).reason == "unmeasured"
    guard.read_done(1 * MB, 1.0)  # 1 MB/s: very slow, but recompute is unknown yet
    verdict = guard.decide(100 * MB, 16)
    assert verdict.take and verdict.reason == "unmeasured" and verdict.read_s == pytest.approx(100)


@pytest.mark.parametrize(
    ("read_s", "take"),
    [(0.79, True), (0.8, True), (0.81, False), (5.0, False)],  # recompute 1 s, margin 0.8
)
def test_a_read_is_taken_only_within_margin_times_the_recompute(read_s: float, take: bool) -> None:
    clock = Clock()
    guard = RecomputeGuard(clock=clock, min_step_tokens=16, margin=0.8)
    timed_step(guard, clock, 1000, 1.0)  # 1,000 tokens/s: 500 tokens in 0.5 s
    guard.read_done(100 * MB, 1.0)  # 100 MB/s
    verdict = guard.decide(int(read_s * 50 * MB), 500)  # recompute: 0.5 s
    assert verdict.take is take and verdict.reason == ("faster" if take else "slower")
    assert verdict.recompute_s == pytest.approx(0.5)


def test_while_skipping_one_lookup_a_probe_interval_reads_again() -> None:
    clock = Clock()
    guard = RecomputeGuard(clock=clock, min_step_tokens=16, probe_after_s=60)
    timed_step(guard, clock, 1000, 0.01)  # 100k tokens/s
    guard.read_done(10 * MB, 1.0)  # 10 MB/s
    assert not guard.decide(10 * MB, 100).take
    clock.advance(59)
    assert not guard.decide(10 * MB, 100).take
    clock.advance(1)
    assert guard.decide(10 * MB, 100).reason == "probe"
    assert not guard.decide(10 * MB, 100).take  # one probe, not one per lookup
    for _ in range(30):  # the probe found a fast disk (100 GB/s): recompute takes 1 ms
        guard.read_done(10 * MB, 0.0001)
    assert guard.decide(10 * MB, 100).reason == "faster"


# -- DiskTier --------------------------------------------------------------------------------
def disk_tier(
    tmp_path: Path, guard: RecomputeGuard | None, *, recompute_guard: bool = True
) -> DiskTier:
    s = spec()
    pool = CPUBlockPool(4, s.block_size)
    disk = DiskConfig(str(tmp_path), 1 << 30, recompute_guard=recompute_guard)
    return DiskTier(disk, s, pool, HitRule([None], 4), KVConnectorStats(), guard=guard)


def only_on_disk(tier: DiskTier) -> None:
    """H0, H1 written to disk, then evicted from the 4-block CPU tier by H2..H5."""
    for hashes in (H[:2], H[2:4], H[4:6]):
        plan = tier.pool.prepare_store(hashes)
        tier.pool.complete_store(plan.block_ids, success=True)
        tier.stored(plan.block_ids)
        jobs = tier.take_jobs()
        if jobs is not None:
            tier.complete(DiskDone(written=jobs.writes))
    assert tier.index.has((0, H[0])) and not tier.pool.is_cached(H[0])


@pytest.mark.parametrize(("read_mb_s", "reads"), [(1.0, False), (1000.0, True)])
def test_disk_tier_skips_a_disk_slower_than_recompute_and_reads_a_faster_one(
    tmp_path: Path, read_mb_s: float, reads: bool
) -> None:
    clock = Clock()
    tier = disk_tier(tmp_path, RecomputeGuard(clock=clock, min_step_tokens=64))
    only_on_disk(tier)
    tier.step_started(640)  # 640 tokens in 0.1 s: 8 tokens (H0, H1) recompute in 1.25 ms
    clock.advance(0.1)
    tier.step_ended()
    tier.complete(DiskDone(read_batches=[ReadBatch(int(read_mb_s * MB), 1.0)]))
    # H0 + H1: two 8 KiB records, 16 ms at 1 MB/s, 16 us at 1 GB/s
    assert tier.promote("r", H, 0, 2) is reads
    jobs = tier.take_jobs()
    read = [b.block_hash for b in jobs.reads] if jobs is not None else []
    assert read == (H[:2] if reads else [])
    assert tier.stats.data.get("disk_guard_skips", 0) == (0 if reads else 1)
    assert tier.num_cpu_reserved == (2 if reads else 0)
    tier.check_integrity()


def test_with_the_guard_off_a_slow_disk_is_still_read(tmp_path: Path) -> None:
    tier = disk_tier(tmp_path, None, recompute_guard=False)
    assert tier.guard is None
    only_on_disk(tier)
    tier.step_started(640)
    tier.step_ended()
    tier.complete(DiskDone(read_batches=[ReadBatch(1, 1000.0)]))
    assert tier.promote("r", H, 0, 2) and "disk_guard_skips" not in tier.stats.data
    assert disk_tier(tmp_path / "on", None).guard is not None  # on by default


def test_skips_reach_metrics_as_kv_offload_disk_guard_skips_total(tmp_path: Path) -> None:
    clock = Clock()
    guard = RecomputeGuard(clock=clock, min_step_tokens=64)
    tier = disk_tier(tmp_path, guard)
    only_on_disk(tier)
    timed_step(guard, clock, 640, 0.1)
    tier.complete(DiskDone(read_batches=[ReadBatch(MB, 1.0)]))
    assert not tier.promote("r", H, 0, 2) and not tier.promote("r2", H, 0, 2)
    metrics = ServerMetrics("tiny")
    metrics.record_connector_stats(tier.stats.take(), name="SimpleCPUOffloadConnector")
    found = {
        (s.name, s.labels.get("connector")): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
    }
    key = ("kvbridge:kv_offload_disk_guard_skips_total", "SimpleCPUOffloadConnector")
    assert found[key] == 2


# -- config ----------------------------------------------------------------------------------
def test_disk_recompute_guard_key_defaults_on_and_rejects_a_non_bool() -> None:
    base = {"kv_offload_backend": "disk", "disk_path": "/tmp/kvb", "disk_capacity_bytes": 1 << 30}
    disk = check_disk_extra(base)
    assert disk is not None and disk.recompute_guard
    off = check_disk_extra({**base, "disk_recompute_guard": False})
    assert off is not None and not off.recompute_guard
    message = r"extra_config\.disk_recompute_guard: expected true or false, got 'no'; false reads"
    with pytest.raises(ConfigError, match=message):
        check_disk_extra({**base, "disk_recompute_guard": "no"})


# -- the tiered halves end to end --------------------------------------------------------------
class Pair:
    """A scheduler/worker pair on ``root`` whose guard runs on ``clock``; a fresh one is a
    restart (empty GPU cache and CPU tier, the records on disk)."""

    def __init__(self, root: Path, clock: Clock) -> None:
        cfg = config(
            num_cpu_blocks=16, kv_offload_backend="disk", disk_path=str(root),
            disk_capacity_bytes=1 << 30, n_read_threads=2, n_write_threads=2,
        )  # fmt: skip
        sched = create_connector(cfg, KVConnectorRole.SCHEDULER, spec())
        worker = create_connector(cfg, KVConnectorRole.WORKER, spec())
        assert isinstance(sched, TieredOffloadScheduler)
        assert isinstance(worker, TieredOffloadWorker)
        assert sched.disk.guard is not None  # on by default
        sched.disk.guard = RecomputeGuard(clock=clock, min_step_tokens=BLOCK_SIZE)
        self.guard = sched.disk.guard
        self.sched, self.worker, self.clock = sched, worker, clock
        worker.register_kv_caches(kv_caches(spec()))
        self.drv = Driver(sched, worker, wire=True)

    def compute(self, req: SimpleRequest, blocks: list[int], seconds: float) -> None:
        """A step that prefills ``req`` and takes ``seconds`` on the guard's clock."""
        n = len(req.prompt_token_ids)
        self.drv.step(scheduled(req, blocks, 0, n), forward=lambda: self.clock.advance(seconds))

    def settle(self) -> None:
        deadline = time.monotonic() + 30
        while self.sched.disk.gauges()["kv_offload_disk_inflight_blocks"]:
            assert time.monotonic() < deadline, "disk I/O still in flight"
            self.drv.step()
            time.sleep(0.001)


A, C = list(range(21)), list(range(100, 121))  # 5 full blocks and one token each


@pytest.mark.parametrize(("recompute_s", "reads"), [(1e-6, False), (1e3, True)])
def test_tiered_halves_weigh_measured_disk_reads_against_measured_recompute(
    tmp_path: Path, recompute_s: float, reads: bool
) -> None:
    """The worker times real reads, the scheduler times steps on the injected clock: recompute
    of 20 tokens in 1 us beats any disk (the hit is skipped, counted), in 1,000 s none does."""
    clock = Clock()
    first = Pair(tmp_path, clock)
    for i, tokens in enumerate((A, C)):
        req = request(f"w{i}", tokens)
        blocks = list(range(1 + 6 * i, 7 + 6 * i))
        first.drv.step(scheduled(req, blocks, 0, 21))
        first.drv.step(scheduled(req, blocks, 21, 1))
        req.num_computed_tokens = 22
        assert first.sched.request_finished(req, blocks) == (False, None)
    first.settle()
    assert first.sched.disk.gauges()["kv_offload_disk_blocks"] == 10
    first.worker.shutdown()

    second = Pair(tmp_path, clock)  # restarted: both prompts only on disk
    b = request("b", [*A, 7])
    assert second.sched.get_num_new_matched_tokens(b, 0) == (None, False)  # nothing measured
    second.settle()
    assert second.guard.read.samples >= 1 and second.guard.read.rate is not None
    second.compute(request("x", list(range(500, 520))), [11, 12, 13, 14, 15], recompute_s)
    assert second.guard.recompute.rate == pytest.approx(20 / recompute_s)
    d = request("d", [*C, 7])
    got = second.sched.get_num_new_matched_tokens(d, 0)
    assert got == ((None, False) if reads else (0, False))
    stats = second.sched.get_kv_connector_stats()
    assert stats is not None and stats.data.get("disk_guard_skips", 0) == (0 if reads else 1)
    second.settle()
    second.worker.shutdown()
