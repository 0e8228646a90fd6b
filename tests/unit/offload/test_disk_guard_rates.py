"""``guard_rates.json``: the recompute guard's rates saved in the disk tier's directory and read
back at start-up (round trip, a bad file ignored, saves rate-limited and atomic)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from disk_guard_helpers import Clock, timed_step
from offload_helpers import spec

from kvbridge.connector.stats import KVConnectorStats
from kvbridge.offload.disk.config import DiskConfig
from kvbridge.offload.disk.guard import Rates, RecomputeGuard
from kvbridge.offload.disk.rates import (
    RATES_FILE,
    GuardRatesStore,
    load_rates,
    save_rates,
)
from kvbridge.offload.disk.tier import DiskTier
from kvbridge.offload.groups import HitRule
from kvbridge.offload.pool import CPUBlockPool

MB = 1_000_000


def measured(clock: Clock) -> RecomputeGuard:
    """A guard that measured 100 MB/s reads, 50 MB/s writes and 1,000 tokens/s."""
    guard = RecomputeGuard(clock=clock, min_step_tokens=16)
    timed_step(guard, clock, 1000, 1.0)
    timed_step(guard, clock, 2000, 2.0)
    guard.read_done(100 * MB, 1.0)
    guard.write_done(50 * MB, 1.0)
    return guard


def test_rates_round_trip_through_the_file_and_seed_a_new_guard(tmp_path: Path) -> None:
    clock = Clock()
    old = measured(clock)
    path = tmp_path / RATES_FILE
    assert save_rates(path, old.rates())
    raw = json.loads(path.read_text())
    assert raw["format"] == "kvbridge-disk-guard-rates" and raw["version"] == 1
    assert raw["read_bytes_per_s"] == pytest.approx(100 * MB) and raw["read_samples"] == 1
    assert raw["write_bytes_per_s"] == pytest.approx(50 * MB) and raw["write_samples"] == 1
    assert raw["recompute_tokens_per_s"] == pytest.approx(1000) and raw["recompute_samples"] == 2
    assert [p.name for p in tmp_path.iterdir()] == [RATES_FILE]  # no temporary file left

    new = RecomputeGuard(clock=clock, min_step_tokens=16)
    assert GuardRatesStore(path).seed(new) is not None
    got, want = new.rates(), old.rates()
    assert got.read_bytes_per_s == pytest.approx(want.read_bytes_per_s)
    assert got.write_bytes_per_s == pytest.approx(want.write_bytes_per_s)
    assert got.recompute_tokens_per_s == pytest.approx(want.recompute_tokens_per_s)
    assert (got.read_samples, got.write_samples, got.recompute_samples) == (1, 1, 2)
    for guard in (old, new):  # 0.5 s to read > 0.4 s to recompute * 0.8: skipped
        verdict = guard.decide(50 * MB, 400)
        assert (verdict.take, verdict.reason) == (False, "slower")
        assert verdict.read_s == pytest.approx(0.5) and verdict.recompute_s == pytest.approx(0.4)
    new.read_done(10 * MB, 1.0)  # later samples move the seeded estimate as an EWMA
    assert new.read.samples == 2 and new.read.rate == pytest.approx(100 * MB * 0.1**0.2)


def test_unmeasured_rates_stay_unmeasured_and_a_seed_never_overrides_this_run(
    tmp_path: Path,
) -> None:
    path = tmp_path / RATES_FILE
    assert save_rates(path, Rates(write_bytes_per_s=2e9, write_samples=3))
    assert load_rates(path) == Rates(None, 0, 2e9, 3, None, 0)
    guard = RecomputeGuard()
    guard.write_done(MB, 1.0)  # measured here before the seed: kept
    guard.seed(Rates(read_bytes_per_s=5e9, read_samples=1, write_bytes_per_s=2e9, write_samples=3))
    assert guard.read.rate == pytest.approx(5e9) and guard.write.rate == pytest.approx(MB)
    assert guard.recompute.rate is None


GOOD = {
    "format": "kvbridge-disk-guard-rates", "version": 1, "saved_at": 0.0,
    "read_bytes_per_s": 1e9, "read_samples": 1, "write_bytes_per_s": None, "write_samples": 0,
    "recompute_tokens_per_s": 1e4, "recompute_samples": 1,
}  # fmt: skip


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b"\x00\xff\xfe garbage",
        b"[1, 2, 3]",
        b'{"read_bytes_per_s": 1e9}',  # fields missing
        json.dumps({**GOOD, "format": "something-else"}).encode(),
        json.dumps({**GOOD, "version": 2}).encode(),
        json.dumps({**GOOD, "read_bytes_per_s": -1.0}).encode(),
        json.dumps({**GOOD, "read_bytes_per_s": 0}).encode(),
        json.dumps({**GOOD, "read_bytes_per_s": "fast"}).encode(),
        json.dumps({**GOOD, "read_samples": -3}).encode(),
        json.dumps(GOOD)
        .replace('"read_bytes_per_s": 1000000000.0', '"read_bytes_per_s": 1e999')
        .encode(),  # inf
    ],
)
def test_a_corrupt_or_foreign_rates_file_is_ignored_with_a_debug_log(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / RATES_FILE
    path.write_bytes(content)
    guard = RecomputeGuard()
    with caplog.at_level(logging.DEBUG, logger="kvbridge.offload.disk.rates"):
        assert GuardRatesStore(path).seed(guard) is None
    assert guard.rates() == Rates()
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    assert "ignoring guard rates" in caplog.records[0].getMessage()


def test_the_good_file_of_the_corrupt_cases_does_load(tmp_path: Path) -> None:
    """The parametrized cases above fail for their one change, not for the rest of GOOD."""
    path = tmp_path / RATES_FILE
    path.write_text(json.dumps(GOOD))
    assert load_rates(path) == Rates(1e9, 1, None, 0, 1e4, 1)


def test_a_missing_file_or_an_unwritable_directory_is_no_error(tmp_path: Path) -> None:
    guard = RecomputeGuard()
    assert GuardRatesStore(tmp_path / RATES_FILE).seed(guard) is None
    gone = tmp_path / "never-made" / RATES_FILE
    assert not save_rates(gone, Rates(read_bytes_per_s=1.0, read_samples=1))
    assert not gone.parent.exists()


def test_saves_are_rate_limited_on_the_guard_clock_and_forced_at_close(tmp_path: Path) -> None:
    clock = Clock()
    guard = RecomputeGuard(clock=clock, min_step_tokens=16)
    path = tmp_path / RATES_FILE
    store = GuardRatesStore(path, every_s=5.0)
    assert not store.maybe_save(guard) and not path.exists()  # nothing learnt yet
    timed_step(guard, clock, 1000, 1.0)
    assert store.maybe_save(guard)  # the first sample is saved at once
    assert load_rates(path) == Rates(None, 0, None, 0, pytest.approx(1000), 1)
    timed_step(guard, clock, 1000, 2.0)
    assert not store.maybe_save(guard)  # 2 s after the last save
    loaded = load_rates(path)
    assert loaded is not None and loaded.recompute_samples == 1
    clock.advance(3.0)
    assert store.maybe_save(guard)  # 5 s after it
    loaded = load_rates(path)
    assert loaded is not None and loaded.recompute_samples == 2
    clock.advance(60.0)
    assert not store.maybe_save(guard)  # nothing new: no write
    guard.write_done(MB, 1.0)
    assert store.maybe_save(guard, force=True)  # shutdown: whatever the interval
    assert not store.maybe_save(guard, force=True)  # and once
    loaded = load_rates(path)
    assert loaded is not None and loaded.write_samples == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [RATES_FILE]


def test_disk_tier_seeds_its_guard_from_its_directory_and_saves_there_at_close(
    tmp_path: Path,
) -> None:
    s = spec()
    disk = DiskConfig(str(tmp_path), 1 << 30)

    def tier() -> DiskTier:
        return DiskTier(
            disk, s, CPUBlockPool(4, s.block_size), HitRule([None], 4), KVConnectorStats()
        )

    first = tier()
    assert first.guard is not None and first.guard.rates() == Rates()
    first.ns_dir.mkdir(parents=True)  # the worker makes it
    first.guard.write_done(MB, 1.0)
    first.close()
    assert (first.ns_dir / RATES_FILE).exists()
    second = tier()
    assert second.guard is not None and second.guard.write.rate == pytest.approx(MB)
    off = DiskTier(
        DiskConfig(str(tmp_path), 1 << 30, recompute_guard=False),
        s, CPUBlockPool(4, s.block_size), HitRule([None], 4), KVConnectorStats(),
    )  # fmt: skip
    off.close()  # no guard: nothing to save, no error


def test_a_batch_is_timed_by_the_union_of_its_blocks_io() -> None:
    from kvbridge.offload.disk.worker import busy_seconds

    # queued behind another batch: the wait before its first block started does not count
    assert busy_seconds([(5.0, 6.0), (5.5, 7.0)]) == 2.0
    # threads in parallel count once; gaps count not at all; order does not matter
    assert busy_seconds([(3.0, 4.0), (0.0, 1.0), (0.5, 1.5), (1.2, 1.4)]) == 2.5
    assert busy_seconds([]) == 0.0
