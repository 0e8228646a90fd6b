"""Wire types of the disk tier between the offload scheduler and its workers (msgspec)."""

from __future__ import annotations

import msgspec


class DiskBlock(msgspec.Struct, frozen=True, array_like=True):
    """One block record: its key and the CPU block it is written from or read into."""

    group: int
    block_hash: bytes
    cpu_block_id: int = -1  # -1: a delete, no CPU block involved


class ReadBatch(msgspec.Struct, frozen=True, array_like=True):
    """One step's disk reads, every one ended: the bytes read (records that loaded) and their
    busy time, the union of the reads' I/O spans (queueing behind earlier batches left out;
    the recompute guard's sample)."""

    nbytes: int
    seconds: float


class WriteBatch(msgspec.Struct, frozen=True, array_like=True):
    """One step's disk writes, every one ended: the bytes written (records that were stored)
    and their busy time, timed as ``ReadBatch`` (the guard's write rate, the prior of its read
    rate until a read is measured)."""

    nbytes: int
    seconds: float


class DiskJobs(msgspec.Struct):
    """Scheduler -> worker: disk work planned this step, run on the worker's I/O threads.

    ``writes``: CPU -> disk, the CPU blocks pinned until reported. ``reads``: disk -> CPU, the
    CPU blocks reserved (not readable) until reported. ``deletes``: records evicted from disk.
    """

    writes: list[DiskBlock] = msgspec.field(default_factory=list)
    reads: list[DiskBlock] = msgspec.field(default_factory=list)
    deletes: list[DiskBlock] = msgspec.field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.writes or self.reads or self.deletes)


class DiskDone(msgspec.Struct):
    """Worker -> scheduler: disk work that ended since the last step, by outcome."""

    written: list[DiskBlock] = msgspec.field(default_factory=list)
    write_failed: list[DiskBlock] = msgspec.field(default_factory=list)
    read: list[DiskBlock] = msgspec.field(default_factory=list)
    read_missing: list[DiskBlock] = msgspec.field(default_factory=list)  # gone, or I/O error
    read_corrupt: list[DiskBlock] = msgspec.field(default_factory=list)  # never loaded
    deleted: list[DiskBlock] = msgspec.field(default_factory=list)
    read_batches: list[ReadBatch] = msgspec.field(default_factory=list)  # read rate samples
    write_batches: list[WriteBatch] = msgspec.field(default_factory=list)  # write rate samples

    def is_empty(self) -> bool:
        return not any(msgspec.structs.astuple(self))
