"""The disk tier's recompute guard: its rate estimates on an injected clock, its decisions, and
DiskTier / the tiered halves skipping a disk hit that recomputing would beat (and counting it)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from disk_guard_helpers import A, C, Clock, Pair, timed_step
from offload_helpers import request, spec
from prometheus_client.parser import text_string_to_metric_families

from kvbridge.config import ConfigError
from kvbridge.connector.stats import KVConnectorStats
from kvbridge.offload.disk.config import DiskConfig, check_disk_extra
from kvbridge.offload.disk.guard import RateEstimate, RecomputeGuard
from kvbridge.offload.disk.metadata import DiskDone, ReadBatch, WriteBatch
from kvbridge.offload.disk.rates import RATES_FILE, load_rates
from kvbridge.offload.disk.tier import DiskTier
from kvbridge.offload.groups import HitRule
from kvbridge.offload.pool import CPUBlockPool
from kvbridge.serve.metrics import ServerMetrics

H = [bytes([i]) * 16 for i in range(8)]
MB = 1_000_000


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


def test_the_write_rate_stands_in_for_the_read_rate_until_a_read_is_measured() -> None:
    """No read yet: a disk writing 1 MB/s is taken to read no faster, so 10 MB (~10 s) loses to
    recomputing 500 tokens (0.5 s); one writing 1 GB/s wins. A measured read replaces the prior."""
    clock = Clock()
    slow = RecomputeGuard(clock=clock, min_step_tokens=16, probe_after_s=60)
    timed_step(slow, clock, 1000, 1.0)  # 1,000 tokens/s
    slow.write_done(MB, 1.0)  # 1 MB/s
    verdict = slow.decide(10 * MB, 500)
    assert (verdict.take, verdict.reason, verdict.from_writes) == (False, "slower", True)
    assert verdict.read_s == pytest.approx(10) and verdict.recompute_s == pytest.approx(0.5)
    clock.advance(60)  # nothing read in this run: the probe interval began at the first skip
    assert slow.decide(10 * MB, 500).reason == "probe"
    slow.read_done(1000 * MB, 1.0)  # the probe measured 1 GB/s: 10 ms
    verdict = slow.decide(10 * MB, 500)
    assert (verdict.take, verdict.reason, verdict.from_writes) == (True, "faster", False)
    assert verdict.read_s == pytest.approx(0.01)
    slow.write_done(MB, 100.0)  # slower writes no longer matter: reads are measured
    assert slow.decide(10 * MB, 500).take

    fast = RecomputeGuard(clock=clock, min_step_tokens=16)
    timed_step(fast, clock, 1000, 1.0)
    fast.write_done(1000 * MB, 1.0)
    verdict = fast.decide(10 * MB, 500)
    assert (verdict.take, verdict.reason, verdict.from_writes) == (True, "faster", True)


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


def test_disk_tier_weighs_its_first_read_by_the_write_batches_the_worker_timed(
    tmp_path: Path,
) -> None:
    clock = Clock()
    guard = RecomputeGuard(clock=clock, min_step_tokens=64)
    tier = disk_tier(tmp_path, guard)
    only_on_disk(tier)
    timed_step(guard, clock, 640, 0.1)  # 8 tokens (H0, H1) recompute in 1.25 ms
    tier.complete(DiskDone(write_batches=[WriteBatch(MB, 1.0)]))  # 16 KiB at 1 MB/s: 16 ms
    assert guard.read.rate is None and guard.write.rate == pytest.approx(MB)
    assert not tier.promote("r", H, 0, 2) and tier.stats.data["disk_guard_skips"] == 1
    tier.complete(DiskDone(read_batches=[ReadBatch(1000 * MB, 1.0)]))  # a read: 1 GB/s
    assert tier.promote("r", H, 0, 2) and tier.num_cpu_reserved == 2
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
@pytest.mark.parametrize(("recompute_s", "reads"), [(1e-6, False), (1e3, True)])
def test_tiered_halves_weigh_measured_disk_reads_against_measured_recompute(
    tmp_path: Path, recompute_s: float, reads: bool
) -> None:
    """The worker times real reads, the scheduler times steps on the injected clock: recompute
    of 20 tokens in 1 us beats any disk (the hit is skipped, counted), in 1,000 s none does."""
    clock = Clock()
    first = Pair(tmp_path, clock)
    first.store_a_and_c()
    assert first.sched.disk.gauges()["kv_offload_disk_blocks"] == 10
    first.worker.shutdown()

    second = Pair(tmp_path, clock)  # restarted: both prompts only on disk
    b = request("b", [*A, 7])
    assert second.sched.get_num_new_matched_tokens(b, 0) == (None, False)  # no recompute yet
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


@pytest.mark.parametrize(("disk_tick_s", "reads"), [(1.0, False), (1e-9, True)])
def test_a_restarted_server_weighs_its_first_disk_hit_by_the_rates_the_last_run_saved(
    tmp_path: Path, disk_tick_s: float, reads: bool
) -> None:
    """The first run writes A and C (each write batch takes >= 1 s, or >= 1 ns, on the worker's
    ticking clock), times a 20-token step at 1 ms and saves its rates at shutdown, having read
    nothing. The restarted run weighs its very first lookup (5 records, 40 KiB) by the saved
    write rate: <= 40 KB/s (~1 s) loses to the 1 ms recompute and is skipped; a fast disk is
    read, and that read's rate replaces the prior (and is saved in turn)."""
    clock = Clock()
    first = Pair(tmp_path, clock, disk_tick_s=disk_tick_s)
    first.store_a_and_c()
    first.compute(request("x", list(range(500, 520))), [11, 12, 13, 14, 15], 1e-3)
    first.settle()
    first.shutdown()
    path = first.sched.disk.ns_dir / RATES_FILE
    saved = load_rates(path)
    assert saved is not None and saved.read_bytes_per_s is None and saved.read_samples == 0
    assert saved.recompute_tokens_per_s == pytest.approx(20 / 1e-3)
    assert saved.write_bytes_per_s is not None and saved.write_samples >= 2
    assert (saved.write_bytes_per_s > 1e10) is reads  # slow: <= 40 KB/s; fast: ns a batch

    second = Pair(tmp_path, clock)  # restarted: nothing measured in this run
    assert second.guard.read.rate is None
    assert second.guard.write.rate == pytest.approx(saved.write_bytes_per_s)
    assert second.guard.recompute.rate == pytest.approx(20 / 1e-3)
    got = second.sched.get_num_new_matched_tokens(request("b", [*A, 7]), 0)
    assert got == ((None, False) if reads else (0, False))
    stats = second.sched.get_kv_connector_stats()
    skips = stats.data.get("disk_guard_skips", 0) if stats is not None else 0
    assert skips == (0 if reads else 1)
    second.settle()
    assert second.guard.read.samples == (1 if reads else 0)
    assert second.guard.decide(1, 20).from_writes is not reads
    second.shutdown()
    resaved = load_rates(path)
    assert resaved is not None and resaved.read_samples == (1 if reads else 0)
