"""DiskTier: the scheduler side of the disk tier behind the CPU tier (torch-free)."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

from kvbridge.connector.gauges import GaugeValues
from kvbridge.connector.stats import KVConnectorStats
from kvbridge.connector.types import (
    BlockRemoved,
    BlockStored,
    IntegrityError,
    KVCacheEvent,
    KVCacheSpec,
    Medium,
)
from kvbridge.offload.disk.config import DiskConfig
from kvbridge.offload.disk.guard import RecomputeGuard
from kvbridge.offload.disk.index import DiskIndex, scan
from kvbridge.offload.disk.metadata import DiskBlock, DiskDone, DiskJobs
from kvbridge.offload.disk.rates import RATES_FILE, GuardRatesStore
from kvbridge.offload.disk.record import (
    group_payload_bytes,
    namespace_dir,
    namespace_fields,
    record_size,
)
from kvbridge.offload.groups import HitRule
from kvbridge.offload.pool import BlockKey, CPUBlockPool

logger = logging.getLogger(__name__)

# A request whose disk reads were undone this often (their CPU blocks evicted before it asked
# again) is served from what the CPU tier holds, so it can never wait for ever.
MAX_READ_ROUNDS = 2
# Writes in flight pin their CPU blocks; beyond this share of the CPU pool a slow disk would
# starve the CPU tier's own stores, so further writes wait unpinned in a backlog (a block the
# CPU tier evicts before its turn is not written: a drop, counted).
MAX_WRITE_PIN_SHARE = 0.5
_TRACKED_REQUESTS = 4096


class DiskTier:
    """Runs in the scheduler; owns the disk index and plans the disk tier's I/O.

    - Write: a block stored on the CPU tier (``stored``) is written to disk unless a record
      of it is there or being written; its CPU block stays pinned until the write ends, so an
      eviction from the CPU tier never waits for the disk, and a restart finds every block
      the CPU tier held. At most half the CPU pool is pinned by writes; the rest wait in a
      backlog. Room on disk: LRU records are evicted (deleted by the worker); with none
      evictable the write is dropped and counted.
    - Read: ``promote`` runs before the CPU match. When the disk extends the request's CPU
      hit, the missing blocks are read back into reserved CPU blocks and the request is asked
      again (``None``); once they are on the CPU tier the ordinary CPU->GPU load serves it.
      With the recompute guard on (``disk_recompute_guard``), a read expected to take longer
      than recomputing its tokens is not started: the CPU hit is served, the skip counted.
      The guard starts from the rates a previous run saved in the directory
      (``guard_rates.json``, ``rates.py``) and saves its own there every few seconds and at
      ``close``.
    - A read that finds no record, a corrupt one (size, header, checksum) or fails (an I/O
      error) frees its CPU block unindexed, deletes the record (announced ``BlockRemoved``),
      counts it and leaves a miss: never wrong tokens.
    """

    def __init__(
        self,
        disk: DiskConfig,
        spec: KVCacheSpec,
        pool: CPUBlockPool,
        rule: HitRule,
        stats: KVConnectorStats,
        guard: RecomputeGuard | None = None,
    ) -> None:
        self.config = disk
        self.pool = pool
        self.rule = rule
        self.stats = stats
        self.ns_dir = namespace_dir(
            disk.path, namespace_fields(spec, disk.namespace, disk.alignment)
        )
        self.sizes = [record_size(n, disk.alignment) for n in group_payload_bytes(spec)]
        self.index = DiskIndex(disk.capacity_bytes)
        self._jobs = DiskJobs()
        self._reading: dict[BlockKey, int] = {}  # key -> CPU block it is read into
        self._writing: dict[BlockKey, int] = {}  # key -> CPU block pinned for its write
        self._deleting: set[BlockKey] = set()  # never re-written before the delete ends
        self._backlog: OrderedDict[BlockKey, int] = OrderedDict()  # key -> CPU block to write
        self._rounds: OrderedDict[str, int] = OrderedDict()  # req id -> reads started
        self._events: list[KVCacheEvent] = []
        self._block_size = spec.block_size
        self._num_groups = spec.num_groups
        if guard is None and disk.recompute_guard:
            guard = RecomputeGuard()
        self.guard = guard  # None: every disk hit is read back
        self.rates = GuardRatesStore(self.ns_dir / RATES_FILE)
        if guard is not None:
            self.rates.seed(guard)
        self._load_existing()

    def _load_existing(self) -> None:
        found = scan(self.ns_dir, self.sizes)
        for key, size, _ in found.entries:
            for victim in self.index.add_ready(key, size):
                self._delete(victim)
        for key in found.wrong_size:
            self._delete(key)
        for path in found.stale_tmp:
            path.unlink(missing_ok=True)
        if found.wrong_size:
            self.stats.incr("disk_corrupt_records", len(found.wrong_size))
        logger.info(
            "disk tier: %s holds %d block records (%.2f of %.2f GiB)%s",
            self.ns_dir,
            len(self.index),
            self.index.used_bytes / 2**30,
            self.config.capacity_bytes / 2**30,
            f"; {len(found.wrong_size)} torn record(s) dropped" if found.wrong_size else "",
        )

    # -- read back --------------------------------------------------------------------------
    def promote(self, req_id: str, hashes: Sequence[bytes], start: int, end: int) -> bool:
        """Read back what the disk adds to the CPU hit of blocks ``[start, end)``; whether
        the request must be asked again (reads in flight)."""
        pool, index = self.pool, self.index

        def on_cpu(g: int, i: int) -> bool:
            return pool.is_cached(hashes[i], g)

        def anywhere(g: int, i: int) -> bool:
            h = hashes[i]
            return pool.is_cached(h, g) or pool.is_storing(h, g) or index.has((g, h))

        cpu_end = self.rule.longest_hit(start, end, on_cpu)
        if cpu_end >= end:
            return False
        full_end = self.rule.longest_hit(start, end, anywhere)
        if full_end <= cpu_end:
            self.stats.incr("disk_misses", 1)
            return False
        read_end = self._fit(hashes, start, cpu_end, full_end)
        if read_end <= cpu_end:
            return False  # no CPU block to read into now: serve the CPU hit, never wait
        waiting = False
        wanted: dict[int, list[bytes]] = {}
        held: dict[int, list[bytes]] = {}  # on the CPU tier, up to the whole hit's end
        for g in range(self.rule.num_groups):
            for i in self.rule.needed(g, start, full_end):
                h = hashes[i]
                if pool.is_storing(h, g):
                    waiting = waiting or i < read_end  # a read (or a GPU store) in flight
                elif pool.is_cached(h, g):
                    held.setdefault(g, []).append(h)
                elif i < read_end:
                    wanted.setdefault(g, []).append(h)
        if not wanted:
            return waiting
        rounds = self._rounds.get(req_id, 0)
        if rounds >= MAX_READ_ROUNDS:
            return False
        if not self._worth_reading(wanted, (read_end - cpu_end) * self._block_size):
            return False  # recomputing is faster: serve the CPU hit
        for g, group_hashes in held.items():  # most recently used: evicted after the others
            pool.prepare_store(group_hashes, g)
        started = 0
        for g, group_hashes in wanted.items():
            plan = pool.prepare_store(group_hashes, g)
            if plan.num_evicted:
                self.stats.incr("evictions", plan.num_evicted)
            for i, cpu in zip(plan.indices, plan.block_ids):
                key = (g, group_hashes[i])
                index.pin(key)
                self._reading[key] = cpu
                self._jobs.reads.append(DiskBlock(g, key[1], cpu))
                started += 1
        if not started:
            return waiting  # no CPU block to stage into: serve the CPU hit
        self._rounds[req_id] = rounds + 1
        self._rounds.move_to_end(req_id)
        while len(self._rounds) > _TRACKED_REQUESTS:
            self._rounds.popitem(last=False)
        return True

    def _worth_reading(self, wanted: dict[int, list[bytes]], num_tokens: int) -> bool:
        """Whether the guard (if on) expects reading ``wanted`` to beat recomputing
        ``num_tokens``; a skip is counted (``disk_guard_skips``)."""
        if self.guard is None:
            return True
        nbytes = sum(self.sizes[g] * len(hashes) for g, hashes in wanted.items())
        if self.guard.decide(nbytes, num_tokens).take:
            return True
        self.stats.incr("disk_guard_skips", 1)
        return False

    def _fit(self, hashes: Sequence[bytes], start: int, cpu_end: int, full_end: int) -> int:
        """The hit's end cut so that its reads fit the CPU blocks free or evictable without
        evicting the hit's own blocks (one full-attention group: a read-back of a shorter
        prefix; several groups: all or nothing)."""
        pool = self.pool
        held = wanted = 0
        for g in range(self.rule.num_groups):
            for i in self.rule.needed(g, start, full_end):
                if pool.is_cached(hashes[i], g):
                    held += 1
                elif not pool.is_storing(hashes[i], g):
                    wanted += 1
        room = pool.num_free + pool.num_cached - pool.num_pinned - held
        if wanted <= room:
            return full_end
        if self.rule.num_groups > 1 or self.rule.is_sliding(0) or room <= 0:
            return cpu_end
        cut, n = cpu_end, 0
        while cut < full_end and n < room:
            h = hashes[cut]
            n += not (pool.is_cached(h, 0) or pool.is_storing(h, 0))
            cut += 1
        return cut

    # -- write ------------------------------------------------------------------------------
    def stored(self, cpu_block_ids: Sequence[int]) -> None:
        """CPU blocks that a GPU->CPU store filled (in prefix order): write those the disk
        lacks. Records are touched last to first (here and in ``_start_writes``), so a prefix
        is evicted from its end: a hit needs an unbroken run from the start."""
        indexed = []
        for cpu in cpu_block_ids:
            key = self.pool.key_of(cpu)
            if key is None or self.pool.cached_block_id(key[1], key[0]) != cpu:
                continue  # a failed or poisoned store: nothing to write
            if key in self.index:
                indexed.append(key)
                continue
            if key in self._deleting or key in self._backlog:
                continue
            self._backlog[key] = cpu
        for key in reversed(indexed):
            self.index.touch(key)
        while len(self._backlog) > self.pool.num_blocks:  # stale entries of a slow disk
            self._backlog.popitem(last=False)
            self.stats.incr("disk_write_drops", 1)
        self._start_writes()

    def _start_writes(self) -> None:
        """Start backlogged writes while fewer than the cap of CPU blocks are pinned by them."""
        cap = max(1, int(self.pool.num_blocks * MAX_WRITE_PIN_SHARE))
        reserved = []
        while self._backlog and len(self._writing) < cap:
            key, cpu = self._backlog.popitem(last=False)
            if key in self.index:
                continue
            if self.pool.cached_block_id(key[1], key[0]) != cpu or key in self._deleting:
                self.stats.incr("disk_write_drops", 1)  # evicted from the CPU tier first
                continue
            evicted = self.index.reserve(key, self.sizes[key[0]])
            if evicted is None:
                self.stats.incr("disk_write_drops", 1)
                continue
            for victim in evicted:
                self._delete(victim)
            if evicted:
                self.stats.incr("disk_evictions", len(evicted))
            self.pool.prepare_load([key[1]], key[0])  # pinned until written
            self._writing[key] = cpu
            self._jobs.writes.append(DiskBlock(key[0], key[1], cpu))
            reserved.append(key)
        for key in reversed(reserved):  # written in prefix order, aged last to first
            self.index.touch(key)

    def _delete(self, key: BlockKey) -> None:
        self.index.remove(key)
        self._deleting.add(key)
        self._jobs.deletes.append(DiskBlock(key[0], key[1]))
        self._events.append(BlockRemoved((key[1],), Medium.STORAGE, self._group_label(key[0])))

    def _group_label(self, group: int) -> int | None:
        return group if self._num_groups > 1 else None

    def take_events(self) -> list[KVCacheEvent]:
        """Blocks written to disk (``BlockStored``) and deleted from it (``BlockRemoved``),
        medium ``STORAGE``, since the last call."""
        events, self._events = self._events, []
        return events

    # -- per step ---------------------------------------------------------------------------
    def step_started(self, num_tokens: int) -> None:
        """An engine step computing ``num_tokens`` tokens was built (times recompute)."""
        if self.guard is not None:
            self.guard.step_started(num_tokens)

    def step_ended(self) -> None:
        """The oldest step built ran."""
        if self.guard is not None:
            self.guard.step_ended()
            self.rates.maybe_save(self.guard)

    def take_jobs(self) -> DiskJobs | None:
        self._start_writes()
        if self._jobs.is_empty():
            return None
        jobs, self._jobs = self._jobs, DiskJobs()
        return jobs

    def complete(self, done: DiskDone) -> None:
        """Apply what the worker's I/O threads finished."""
        pool, index = self.pool, self.index
        for b in done.written:
            pool.complete_load([self._writing.pop((b.group, b.block_hash))], success=True)
            index.commit((b.group, b.block_hash))
            label = self._group_label(b.group)
            self._events.append(
                BlockStored((b.block_hash,), Medium.STORAGE, self._block_size, label)
            )
        for b in done.write_failed:
            pool.complete_load([self._writing.pop((b.group, b.block_hash))], success=False)
            index.remove((b.group, b.block_hash))
        if done.write_failed:
            self.stats.incr("disk_write_errors", len(done.write_failed))
        for b in reversed(done.read):  # submitted in prefix order: touched last to first
            key = (b.group, b.block_hash)
            pool.complete_store([self._reading.pop(key)], success=True)
            index.unpin(key)
            index.touch(key)
        if done.read:
            self.stats.incr("disk_hits", len(done.read))
        if self.guard is not None:
            for batch in done.read_batches:
                self.guard.read_done(batch.nbytes, batch.seconds)
            for wbatch in done.write_batches:
                self.guard.write_done(wbatch.nbytes, wbatch.seconds)
        for blocks, what in ((done.read_missing, "missing"), (done.read_corrupt, "corrupt")):
            for b in blocks:
                key = (b.group, b.block_hash)
                pool.complete_store([self._reading.pop(key)], success=False)
                index.unpin(key)
                # never read again; the worker removes the file (if any: a read that failed
                # with an I/O error leaves it, which would escape the capacity bound)
                self._delete(key)
            if blocks:
                self.stats.incr(f"disk_{what}_records", len(blocks))
        for b in done.deleted:
            self._deleting.discard((b.group, b.block_hash))

    def close(self) -> None:
        """Save what the guard learnt since its last save (the scheduler shuts down)."""
        if self.guard is not None:
            self.rates.maybe_save(self.guard, force=True)

    # -- gauges and checks ------------------------------------------------------------------
    @property
    def num_cpu_pins(self) -> int:
        """CPU blocks pinned by writes in flight."""
        return len(self._writing)

    @property
    def num_cpu_reserved(self) -> int:
        """CPU blocks reserved by reads in flight."""
        return len(self._reading)

    def gauges(self) -> GaugeValues:
        return {
            "kv_offload_disk_blocks": len(self.index),
            "kv_offload_disk_bytes": self.index.used_bytes,
            "kv_offload_disk_inflight_blocks": (
                len(self._reading) + len(self._writing) + len(self._backlog)
            ),
        }

    def check_integrity(self) -> None:
        self.index.check_integrity()
        if any(k not in self.index or self.index.has(k) for k in self._writing):
            raise IntegrityError("DiskTier integrity: a write in flight is not reserved")
        if any(not self.index.has(k) for k in self._reading):
            raise IntegrityError("DiskTier integrity: a read in flight has no record")
        if self.index.num_pins != len(self._reading):
            raise IntegrityError("DiskTier integrity: record pins and reads disagree")
