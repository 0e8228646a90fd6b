"""Wire types between the offload scheduler and its workers (msgspec, no torch)."""

from __future__ import annotations

import msgspec

from kvbridge.connector.base import KVConnectorMetadata, KVConnectorWorkerMetadata
from kvbridge.offload.disk.metadata import DiskDone, DiskJobs


class TransferJob(msgspec.Struct, frozen=True, kw_only=True):
    """One request's blocks of one KV cache group to move this step.

    ``gpu_block_ids[i]`` <-> ``cpu_block_ids[i]``, copied for the layers of ``group`` only
    (``KVCacheSpec.groups[group].layer_names``; every layer on a single-group cache).
    """

    job_id: int
    req_id: str
    gpu_block_ids: list[int]
    cpu_block_ids: list[int]
    group: int = 0

    @property
    def num_blocks(self) -> int:
        return len(self.gpu_block_ids)


class CPUOffloadMetadata(KVConnectorMetadata):
    """Scheduler -> worker, once per step.

    ``loads`` run CPU -> GPU in ``start_load_kv``; ``stores`` run GPU -> CPU after the forward.
    ``report_when_done`` lists finished requests whose blocks the engine keeps until the worker
    reports them in ``finished_sending`` once none of their jobs is in flight. ``disk``: the
    disk tier's reads, writes and deletes (``kv_offload_backend: "disk"`` only).
    """

    loads: list[TransferJob] = msgspec.field(default_factory=list)
    stores: list[TransferJob] = msgspec.field(default_factory=list)
    report_when_done: list[str] = msgspec.field(default_factory=list)
    disk: DiskJobs | None = None

    def is_empty(self) -> bool:
        return not (self.loads or self.stores or self.report_when_done or self.disk)


class CPUOffloadWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler: job ids that completed or failed since the last step, and the
    disk tier's ended I/O (``disk``)."""

    completed_loads: list[int] = msgspec.field(default_factory=list)
    failed_loads: list[int] = msgspec.field(default_factory=list)
    completed_stores: list[int] = msgspec.field(default_factory=list)
    failed_stores: list[int] = msgspec.field(default_factory=list)
    disk: DiskDone | None = None

    def is_empty(self) -> bool:
        return not (
            self.completed_loads
            or self.failed_loads
            or self.completed_stores
            or self.failed_stores
            or self.disk
        )
