"""DiskTier's plans against a real CPU pool, without a worker: what it writes, reads, deletes
and counts, and that a request never waits on the disk for ever."""

from __future__ import annotations

from pathlib import Path

from offload_helpers import spec

from kvbridge.connector.stats import KVConnectorStats
from kvbridge.connector.types import BlockRemoved, BlockStored, Medium
from kvbridge.offload.disk.config import DiskConfig
from kvbridge.offload.disk.io import RecordIO
from kvbridge.offload.disk.metadata import DiskDone, DiskJobs
from kvbridge.offload.disk.record import (
    group_payload_bytes,
    namespace_digest,
    namespace_fields,
    record_path,
)
from kvbridge.offload.disk.tier import MAX_READ_ROUNDS, DiskTier
from kvbridge.offload.groups import HitRule
from kvbridge.offload.pool import CPUBlockPool

H = [bytes([i]) * 16 for i in range(8)]


def make(tmp_path: Path, cpu_blocks: int = 4, records: int = 8) -> tuple[DiskTier, CPUBlockPool]:
    s = spec()
    pool = CPUBlockPool(cpu_blocks, s.block_size)
    probe = DiskTier(
        DiskConfig(str(tmp_path), 1 << 30), s, pool, HitRule([None], 4), KVConnectorStats()
    )
    size = probe.sizes[0]
    tier = DiskTier(
        DiskConfig(str(tmp_path), records * size), s, pool, HitRule([None], 4), KVConnectorStats()
    )
    return tier, pool


def store(
    pool: CPUBlockPool, tier: DiskTier, hashes: list[bytes], *, written: bool = True
) -> DiskJobs | None:
    """Store ``hashes`` on the CPU tier; the disk jobs that planned (writes done if ``written``)."""
    plan = pool.prepare_store(hashes)
    pool.complete_store(plan.block_ids, success=True)
    tier.stored(plan.block_ids)
    jobs = tier.take_jobs()
    if written and jobs is not None:
        tier.complete(DiskDone(written=jobs.writes))
    return jobs


def test_writes_pin_cpu_blocks_until_written_then_the_disk_serves_what_the_cpu_lost(
    tmp_path: Path,
) -> None:
    tier, pool = make(tmp_path)
    jobs = store(pool, tier, H[:2], written=False)
    assert jobs is not None and [b.block_hash for b in jobs.writes] == H[:2]
    assert pool.num_pins == 2 and not tier.index.has((0, H[0]))  # pinned, not a hit yet
    tier.complete(DiskDone(written=jobs.writes))
    assert pool.num_pins == 0 and tier.index.has((0, H[0]))
    store(pool, tier, H[2:6])  # the CPU tier (4 blocks) evicts H0 and H1
    assert not pool.is_cached(H[0])
    assert tier.promote("r", H, 0, 2)  # reads started: ask again
    jobs = tier.take_jobs()
    assert jobs is not None and [b.block_hash for b in jobs.reads] == H[:2]
    assert tier.promote("r", H, 0, 2)  # still reading
    assert tier.take_jobs() is None
    tier.check_integrity()
    tier.complete(DiskDone(read=jobs.reads))
    assert pool.is_cached(H[0]) and pool.is_cached(H[1])
    assert not tier.promote("r", H, 0, 2)  # a CPU hit now: the CPU tier answers
    assert tier.stats.data["disk_hits"] == 2


def test_a_request_whose_read_blocks_keep_being_evicted_stops_waiting(tmp_path: Path) -> None:
    tier, pool = make(tmp_path, cpu_blocks=4)
    store(pool, tier, H[:2])
    for round_ in range(MAX_READ_ROUNDS):
        for k in range(4):  # push H0, H1 out of the 4-block CPU tier
            store(pool, tier, [bytes([100 + 4 * round_ + k]) * 16])
        assert tier.promote("r", H, 0, 2)
        jobs = tier.take_jobs()
        assert jobs is not None and jobs.reads
        tier.complete(DiskDone(read=jobs.reads))
    for k in range(4):
        store(pool, tier, [bytes([200 + k]) * 16])
    assert not tier.promote("r", H, 0, 2)  # no third round: the CPU hit (none) is served
    assert tier.promote("other", H, 0, 2)  # another request still may


def test_budget_evicts_the_oldest_record_and_never_rewrites_one_being_deleted(
    tmp_path: Path,
) -> None:
    tier, pool = make(tmp_path, cpu_blocks=8, records=3)
    store(pool, tier, H[:3])  # one prefix: aged last to first, its end is the oldest
    jobs = store(pool, tier, H[3:4])  # over the 3-record budget: H2's record goes
    assert jobs is not None and [b.block_hash for b in jobs.deletes] == [H[2]]
    assert tier.stats.data["disk_evictions"] == 1
    tier.stored([pool.cached_block_id(H[2]) or 0])  # stored again while being deleted
    assert tier.take_jobs() is None
    tier.complete(DiskDone(deleted=jobs.deletes))
    tier.stored([pool.cached_block_id(H[2]) or 0])  # now it may be written again
    again = tier.take_jobs()
    assert again is not None and [b.block_hash for b in again.writes] == [H[2]]
    tier.check_integrity()


def test_a_prefix_is_evicted_from_disk_from_its_end(tmp_path: Path) -> None:
    """Written in prefix order, a prefix's records age last to first, so eviction leaves its
    start (what a hit needs). Checked against the build that aged them in prefix order: the
    first record went first and the rest could never be hit."""
    tier, pool = make(tmp_path, cpu_blocks=8, records=4)
    store(pool, tier, H[:4])
    jobs = store(pool, tier, H[4:6])
    assert jobs is not None and [b.block_hash for b in jobs.deletes] == [H[3], H[2]]
    assert tier.index.has((0, H[0])) and tier.index.has((0, H[1]))
    tier.check_integrity()


def test_a_corrupt_record_frees_its_cpu_block_and_is_deleted(tmp_path: Path) -> None:
    tier, pool = make(tmp_path, cpu_blocks=4)
    store(pool, tier, H[:2])
    store(pool, tier, H[2:4])
    store(pool, tier, H[4:6])  # H0, H1 now only on disk
    assert tier.promote("r", H, 0, 2)
    jobs = tier.take_jobs()
    assert jobs is not None
    tier.complete(DiskDone(read=jobs.reads[1:], read_corrupt=jobs.reads[:1]))
    assert tier.stats.data["disk_corrupt_records"] == 1 and not tier.index.has((0, H[0]))
    assert not pool.is_cached(H[0]) and pool.is_cached(H[1]) and pool.num_storing == 0
    deletes = tier.take_jobs()
    assert deletes is not None and [b.block_hash for b in deletes.deletes] == [H[0]]
    assert not tier.promote("r", H, 0, 2)  # H0 is nowhere now: a miss
    tier.check_integrity()


def test_reads_fit_the_cpu_room_left_and_never_wait_without_any(tmp_path: Path) -> None:
    """Pins (writes in flight, other requests' loads) leave room for one read: the first
    missing block is read (a shorter hit) and the blocks the request already holds stay;
    with no room at all the request is answered at once."""
    tier, pool = make(tmp_path, cpu_blocks=8, records=16)
    store(pool, tier, H[:4])  # on disk
    store(pool, tier, H[4:8])  # the CPU tier is full
    pinned = store(pool, tier, [bytes([9]) * 16, bytes([10]) * 16], written=False)  # H0, H1 out
    assert pinned is not None and pool.num_pins == 2  # their writes are in flight
    pool.prepare_load(H[4:7])  # three more pinned by loads
    assert tier.promote("r", H, 0, 4)
    jobs = tier.take_jobs()
    assert jobs is not None and [b.block_hash for b in jobs.reads] == H[:1]
    assert pool.is_cached(H[2]) and pool.is_cached(H[3])
    tier.complete(DiskDone(read=jobs.reads))
    assert pool.is_cached(H[0])
    tier2, pool2 = make(tmp_path / "full", cpu_blocks=4)
    store(pool2, tier2, H[:2])
    store(pool2, tier2, H[2:4])
    store(pool2, tier2, H[4:6])  # H0, H1 only on disk now
    pool2.prepare_load(H[2:6])  # every CPU block pinned (by other requests' loads)
    assert not tier2.promote("r", H, 0, 2) and tier2.take_jobs() is None


def test_writes_pin_at_most_half_the_cpu_pool_the_rest_wait(tmp_path: Path) -> None:
    tier, pool = make(tmp_path, cpu_blocks=4)
    jobs = store(pool, tier, H[:4], written=False)  # a slow disk: no write has ended
    assert jobs is not None and [b.block_hash for b in jobs.writes] == H[:2]
    assert pool.num_pins == 2 and tier.gauges()["kv_offload_disk_inflight_blocks"] == 4
    tier.complete(DiskDone(written=jobs.writes))
    later = tier.take_jobs()  # the backlog goes out as pins drop
    assert later is not None and [b.block_hash for b in later.writes] == H[2:4]
    tier.complete(DiskDone(written=later.writes))
    assert pool.num_pins == 0 and "disk_write_drops" not in tier.stats.data
    backlog = store(pool, tier, H[4:8], written=False)  # evicts H0..H3 from the CPU tier
    assert backlog is not None and len(backlog.writes) == 2
    fresh = [bytes([50 + k]) * 16 for k in range(2)]
    store(pool, tier, fresh, written=False)  # H6, H7 leave the CPU tier, still backlogged
    tier.complete(DiskDone(written=backlog.writes))
    nxt = tier.take_jobs()
    assert nxt is not None and [b.block_hash for b in nxt.writes] == fresh
    assert tier.stats.data["disk_write_drops"] == 2  # H6, H7: gone before their turn


def test_kv_events_announce_records_written_and_deleted_on_storage(tmp_path: Path) -> None:
    tier, pool = make(tmp_path, cpu_blocks=8, records=2)
    store(pool, tier, H[:2])
    assert tier.take_events() == [
        BlockStored((H[0],), Medium.STORAGE, 4, None),
        BlockStored((H[1],), Medium.STORAGE, 4, None),
    ]
    store(pool, tier, H[2:3])  # over the 2-record budget: H1's record (the prefix's end) goes
    assert tier.take_events() == [
        BlockRemoved((H[1],), Medium.STORAGE, None),
        BlockStored((H[2],), Medium.STORAGE, 4, None),
    ]
    assert tier.take_events() == []


def test_a_missing_or_unreadable_record_leaves_the_index_as_a_corrupt_one_does(
    tmp_path: Path,
) -> None:
    """A read that found no record, or failed (EIO, EACCES, EMFILE: reported as missing too),
    frees its CPU block and counts a missing record; the record is deleted (an unreadable
    file would otherwise stay on disk outside the capacity bound) and announced removed."""
    tier, pool = make(tmp_path, cpu_blocks=4)
    store(pool, tier, H[:2])
    store(pool, tier, H[2:4])
    store(pool, tier, H[4:6])  # H0, H1 now only on disk
    tier.take_events()
    assert tier.promote("r", H, 0, 2)
    jobs = tier.take_jobs()
    assert jobs is not None
    tier.complete(DiskDone(read=jobs.reads[1:], read_missing=jobs.reads[:1]))
    assert tier.stats.data["disk_missing_records"] == 1 and not tier.index.has((0, H[0]))
    assert "disk_corrupt_records" not in tier.stats.data and tier.stats.data["disk_hits"] == 1
    assert not pool.is_cached(H[0]) and pool.is_cached(H[1]) and pool.num_storing == 0
    assert tier.take_events() == [BlockRemoved((H[0],), Medium.STORAGE, None)]
    deletes = tier.take_jobs()
    assert deletes is not None and [b.block_hash for b in deletes.deletes] == [H[0]]
    tier.check_integrity()


def test_servers_with_other_alignments_never_share_a_directory(tmp_path: Path) -> None:
    """The alignment sets the record size: a server started with another one on the same
    disk_path gets its own directory and leaves the first one's records alone (sharing one,
    it would find them all torn and delete them)."""
    s = spec()

    def tier(alignment: int) -> DiskTier:
        cfg = DiskConfig(str(tmp_path), 1 << 30, alignment=alignment)
        return DiskTier(
            cfg, s, CPUBlockPool(4, s.block_size), HitRule([None], 4), KVConnectorStats()
        )

    first = tier(4096)
    n = group_payload_bytes(s)[0]
    io = RecordIO(namespace_digest(namespace_fields(s, "", 4096)), 4096, False, n)
    path = record_path(first.ns_dir, 0, H[0])
    io.write(path, 0, H[0], [memoryview(bytes(n))])
    other = tier(512)
    assert other.ns_dir != first.ns_dir and len(other.index) == 0
    assert other.take_jobs() is None and "disk_corrupt_records" not in other.stats.data
    assert path.exists() and tier(4096).index.has((0, H[0]))
