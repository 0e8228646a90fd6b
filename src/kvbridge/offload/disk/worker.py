"""DiskWorker: runs the disk tier's reads, writes and deletes on I/O threads in a worker."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvbridge.config import ConfigError
from kvbridge.connector.stats import KVConnectorStats
from kvbridge.connector.types import KVCacheSpec
from kvbridge.offload.disk.config import DiskConfig
from kvbridge.offload.disk.io import RecordIO, filesystem_type, probe_direct, unique_tag
from kvbridge.offload.disk.metadata import DiskBlock, DiskDone, DiskJobs, ReadBatch, WriteBatch
from kvbridge.offload.disk.record import (
    CorruptRecord,
    group_payload_bytes,
    namespace_digest,
    namespace_dir,
    namespace_fields,
    record_path,
)

if TYPE_CHECKING:
    import numpy as np
    import torch

logger = logging.getLogger(__name__)

_KINDS = {"write": "cpu_to_disk", "read": "disk_to_cpu"}


@dataclass
class _Batch:
    """One step's blocks of one kind; its busy time (``busy_seconds``) feeds the GB/s
    counters (and, for reads and writes, the scheduler's recompute guard)."""

    kind: str
    started: float
    remaining: int
    nbytes: int = 0
    # (start, end) of each block's I/O on its thread: the batch's busy time is their union, so
    # neither queueing behind earlier batches nor threads working in parallel distort it
    spans: list[tuple[float, float]] = field(default_factory=list)


class DiskWorker:
    """Runs in a worker; owns the disk tier's I/O threads and views of the CPU pool's blocks.

    ``submit`` queues a step's jobs and returns at once (reads and writes on their own
    thread pools, so a read never waits behind a burst of writes); ``poll`` collects what
    ended, never waiting. A CPU block is read or written through ``cpu_layers[g][l][id]``,
    the copy backend's host tensor of layer ``l`` of group ``g`` (one block per row), each
    row a dense run of bytes: written in place with O_DIRECT when its address and length are
    aligned, else through an aligned staging buffer. ``clock`` times the batches (a test may
    replace it; it is read on the I/O threads).
    """

    def __init__(
        self,
        disk: DiskConfig,
        spec: KVCacheSpec,
        cpu_layers: list[list[torch.Tensor]],
        stats: KVConnectorStats | None = None,
    ) -> None:
        fields = namespace_fields(spec, disk.namespace, disk.alignment)
        self.ns_dir = namespace_dir(disk.path, fields)
        try:
            self.ns_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(
                f"kv_connector_extra_config.disk_path: cannot create {self.ns_dir} ({e}); "
                "point it at a writable directory"
            ) from e
        _write_namespace_file(self.ns_dir, fields)
        self.filesystem = filesystem_type(self.ns_dir)
        direct = disk.direct
        why = probe_direct(self.ns_dir, disk.alignment) if direct else None
        if why is not None:
            logger.warning(
                "disk tier: O_DIRECT is refused on %s (%s: %s); falling back to buffered I/O "
                "through the page cache",
                self.ns_dir,
                self.filesystem,
                why,
            )
            direct = False
        self.direct = direct
        self._payload = group_payload_bytes(spec)
        self.io = RecordIO(namespace_digest(fields), disk.alignment, direct, max(self._payload))
        self._rows = [[_byte_rows(t) for t in layers] for layers in cpu_layers]
        self._readers = ThreadPoolExecutor(disk.n_read_threads, "kvbridge-disk-read")
        self._writers = ThreadPoolExecutor(disk.n_write_threads, "kvbridge-disk-write")
        self._inflight: list[tuple[_Batch, str, DiskBlock, Future[tuple[int, float, float]]]] = []
        self.stats = KVConnectorStats() if stats is None else stats
        self.clock: Callable[[], float] = time.perf_counter
        self._problems = 0  # I/O errors and corrupt records seen (for rate-limited logs)
        logger.info(
            "disk tier: %s on %s, %s, %d read + %d write threads, %.2f GiB per worker",
            self.ns_dir,
            self.filesystem,
            f"O_DIRECT (alignment {disk.alignment})" if direct else "buffered (page cache)",
            disk.n_read_threads,
            disk.n_write_threads,
            disk.capacity_bytes / 2**30,
        )

    def parts(self, block: DiskBlock) -> list[memoryview]:
        """The CPU block's bytes, one view per layer of its group, in layer order."""
        return [memoryview(rows[block.cpu_block_id]) for rows in self._rows[block.group]]

    def _write(self, block: DiskBlock) -> int:
        path = record_path(self.ns_dir, block.group, block.block_hash)
        return self.io.write(path, block.group, block.block_hash, self.parts(block))

    def _read(self, block: DiskBlock) -> int:
        path = record_path(self.ns_dir, block.group, block.block_hash)
        return self.io.read(path, block.group, block.block_hash, self.parts(block))

    def _delete(self, block: DiskBlock) -> int:
        record_path(self.ns_dir, block.group, block.block_hash).unlink(missing_ok=True)
        return 0

    # -- per step ---------------------------------------------------------------------------
    def submit(self, jobs: DiskJobs) -> None:
        """Queue a step's disk jobs on the I/O threads; returns at once."""
        now = self.clock()
        for kind, blocks, pool, fn in (
            ("read", jobs.reads, self._readers, self._read),
            ("write", jobs.writes, self._writers, self._write),
            ("delete", jobs.deletes, self._writers, self._delete),
        ):
            if blocks:
                batch = _Batch(kind, now, len(blocks))
                for b in blocks:
                    future = pool.submit(_timed, fn, b, self.clock)
                    self._inflight.append((batch, kind, b, future))

    def poll(self) -> DiskDone | None:
        """What ended since the last poll, by outcome (never waits)."""
        done = DiskDone()
        pending = []
        for batch, kind, block, future in self._inflight:
            if not future.done():
                pending.append((batch, kind, block, future))
                continue
            self._settle(done, batch, kind, block, future)
        self._inflight = pending
        return None if done.is_empty() else done

    def _settle(
        self,
        done: DiskDone,
        batch: _Batch,
        kind: str,
        block: DiskBlock,
        future: Future[tuple[int, float, float]],
    ) -> None:
        path = record_path(self.ns_dir, block.group, block.block_hash)
        try:
            nbytes, began, ended = future.result()
            batch.nbytes += nbytes
            batch.spans.append((began, ended))
        except CorruptRecord as e:
            self._warn("disk tier: corrupt record %s (%s); served as a miss", path, e)
            done.read_corrupt.append(block)
        except FileNotFoundError:
            {"read": done.read_missing, "write": done.write_failed, "delete": done.deleted}[
                kind
            ].append(block)
        except Exception as e:
            self._warn("disk tier: %s of %s failed: %s", kind, path, e)
            {"read": done.read_missing, "write": done.write_failed, "delete": done.deleted}[
                kind
            ].append(block)
        else:
            {"read": done.read, "write": done.written, "delete": done.deleted}[kind].append(block)
        batch.remaining -= 1
        if batch.remaining == 0 and kind in _KINDS and batch.nbytes:
            seconds = busy_seconds(batch.spans)
            self.stats.incr(f"{_KINDS[kind]}_bytes", batch.nbytes)
            self.stats.observe(f"{_KINDS[kind]}_time_s", seconds)
            if kind == "read":
                done.read_batches.append(ReadBatch(batch.nbytes, seconds))
            else:
                done.write_batches.append(WriteBatch(batch.nbytes, seconds))

    def _warn(self, message: str, *args: object) -> None:
        """Log the first problems, then one in a thousand (a full disk fails every write)."""
        self._problems += 1
        if self._problems <= 10 or self._problems % 1000 == 0:
            logger.warning(message + " (problem %d)", *args, self._problems)

    @property
    def num_inflight(self) -> int:
        return len(self._inflight)

    def wait_idle(self, timeout_s: float = 30.0) -> None:
        """Block until every queued job ended (tests, benchmarks, shutdown)."""
        deadline = time.monotonic() + timeout_s
        for *_, future in list(self._inflight):
            future.exception(timeout=max(0.0, deadline - time.monotonic()))

    def shutdown(self) -> None:
        """Drop queued reads, finish every write (a restart finds what this run stored) and
        delete. Idempotent."""
        self._readers.shutdown(wait=True, cancel_futures=True)
        queued = sum(1 for _, kind, _, f in self._inflight if kind == "write" and not f.done())
        if queued:
            logger.info("disk tier: finishing %d block write(s) before shutdown", queued)
        self._writers.shutdown(wait=True)


def busy_seconds(spans: list[tuple[float, float]]) -> float:
    """The length of the union of ``(start, end)`` spans: the time a batch's blocks kept the
    disk busy, counting overlapping blocks once and the gaps between them not at all."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _timed(
    fn: Callable[[DiskBlock], int], block: DiskBlock, clock: Callable[[], float]
) -> tuple[int, float, float]:
    """``fn(block)``'s bytes, and when its thread started and ended it."""
    began = clock()
    return fn(block), began, clock()


def _byte_rows(layer: torch.Tensor) -> np.ndarray:
    """``layer`` ([num_blocks, ...], a block dense) as ``[num_blocks, block bytes]`` (no copy)."""
    import torch

    raw = layer.view(torch.uint8)
    if not raw[0].is_contiguous():
        raise ConfigError(
            "kv_offload_backend 'disk': the CPU pool's layer tensors must keep each block in "
            f"one dense run of bytes (got strides {tuple(layer.stride())})"
        )
    return torch.as_strided(raw, (raw.shape[0], raw[0].numel()), (raw.stride(0), 1)).numpy()


def _write_namespace_file(ns_dir: os.PathLike[str], fields: dict[str, object]) -> None:
    """``namespace.json``: what the directory's digest covers, for people (written once)."""
    path = os.path.join(ns_dir, "namespace.json")
    if os.path.exists(path):
        return
    tmp = f"{path}.{unique_tag()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(fields, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except (FileNotFoundError, FileExistsError):
        if not os.path.exists(path):
            raise
        # another server wrote it first (the same fields: the digest names the directory)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
