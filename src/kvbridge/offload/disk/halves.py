"""The CPU tier's halves with the disk tier behind it (``kv_offload_backend: "disk"``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvbridge.config import TransferConfig
from kvbridge.connector.base import ConnectorOutput, KVConnectorMetadata
from kvbridge.connector.gauges import GaugeValues
from kvbridge.connector.types import (
    KVCacheEvent,
    KVCacheSpec,
    MatchResult,
    RequestView,
    SchedulerStep,
)
from kvbridge.offload.disk.config import DiskConfig
from kvbridge.offload.disk.metadata import DiskDone
from kvbridge.offload.disk.tier import DiskTier
from kvbridge.offload.metadata import CPUOffloadMetadata, CPUOffloadWorkerMetadata
from kvbridge.offload.scheduler import CPUOffloadScheduler, JobKind
from kvbridge.offload.worker import CPUOffloadWorker

if TYPE_CHECKING:
    import torch

    from kvbridge.offload.disk.worker import DiskWorker


class TieredOffloadScheduler(CPUOffloadScheduler):
    """Runs in the scheduler; the CPU tier's bookkeeping plus the disk tier's (``DiskTier``).

    - A lookup that the disk extends beyond the CPU hit starts its reads and answers "ask
      again" (``None``); the next answer is the CPU tier's, the read blocks now on it.
    - A block stored on the CPU tier is then written to disk (its CPU block pinned meanwhile).
    - Each step is timed from ``build_connector_meta`` to ``update_connector_output``: the
      recompute rate the disk's recompute guard weighs reads against. ``shutdown`` saves the
      guard's rates for the next run.
    """

    def __init__(self, config: TransferConfig, cache_spec: KVCacheSpec) -> None:
        super().__init__(config, cache_spec)
        if self.offload.disk is None:
            raise ValueError("TieredOffloadScheduler: kv_offload_backend is not 'disk'")
        self.disk = DiskTier(self.offload.disk, cache_spec, self.pool, self.rule, self._stats)

    def get_num_new_matched_tokens(
        self, request: RequestView, num_computed_tokens: int
    ) -> MatchResult:
        hashes = request.block_hashes
        if hashes and num_computed_tokens % self.block_size == 0:
            start = num_computed_tokens // self.block_size
            end = min(len(hashes), (request.num_tokens - 1) // self.block_size)
            if end > start and self.disk.promote(request.request_id, hashes, start, end):
                state = self._requests.get(request.request_id)
                if state is not None:
                    self._release_match(state)
                return MatchResult(None, False)
        return super().get_num_new_matched_tokens(request, num_computed_tokens)

    def build_connector_meta(self, step: SchedulerStep) -> CPUOffloadMetadata:
        self.disk.step_started(sum(s.num_scheduled_tokens for s in step.scheduled))
        meta = super().build_connector_meta(step)
        meta.disk = self.disk.take_jobs()
        return meta

    def update_connector_output(self, output: ConnectorOutput) -> None:
        self.disk.step_ended()  # the oldest step built has run: a recompute sample
        super().update_connector_output(output)
        meta = output.worker_meta
        if isinstance(meta, CPUOffloadWorkerMetadata) and meta.disk is not None:
            self.disk.complete(meta.disk)

    def _complete_job(self, job_id: int, ok: bool) -> None:
        job = self._jobs.get(job_id)
        super()._complete_job(job_id, ok)
        if job is not None and job.kind is JobKind.STORE:
            self.disk.stored(job.wire.cpu_block_ids)  # those now cached go to disk

    def get_kv_connector_gauges(self) -> GaugeValues:
        return {**super().get_kv_connector_gauges(), **self.disk.gauges()}

    def take_events(self) -> list[KVCacheEvent]:
        return [*super().take_events(), *self.disk.take_events()]

    def _own_holds(self) -> tuple[int, int]:
        storing, pins = super()._own_holds()
        return storing - self.disk.num_cpu_reserved, pins - self.disk.num_cpu_pins

    def check_integrity(self) -> None:
        super().check_integrity()
        self.disk.check_integrity()

    def shutdown(self) -> None:
        self.disk.close()  # the guard's rates, for the next run
        super().shutdown()


class TieredOffloadWorker(CPUOffloadWorker):
    """Runs in a worker; the CPU tier's copies plus the disk tier's I/O threads
    (``DiskWorker``, over the CPU pool tensors of the copy backends)."""

    def __init__(self, config: TransferConfig, cache_spec: KVCacheSpec) -> None:
        super().__init__(config, cache_spec)
        if self.offload.disk is None:
            raise ValueError("TieredOffloadWorker: kv_offload_backend is not 'disk'")
        self._disk_config: DiskConfig = self.offload.disk
        self.disk: DiskWorker | None = None

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from kvbridge.offload.disk.worker import DiskWorker

        super().register_kv_caches(kv_caches)
        layers = [list(b.cpu_layers) for b in self.backends]  # group -> its CPU layer tensors
        self.disk = DiskWorker(self._disk_config, self.cache_spec, layers, self._stats)

    def bind_connector_metadata(self, metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(metadata)
        if isinstance(metadata, CPUOffloadMetadata) and metadata.disk is not None:
            if self.disk is None:
                raise RuntimeError("TieredOffloadWorker: disk jobs before register_kv_caches")
            self.disk.submit(metadata.disk)

    def build_connector_worker_meta(self) -> CPUOffloadWorkerMetadata | None:
        done = self.disk.poll() if self.disk is not None else None
        if done is not None:
            self._done.disk = _merge(self._done.disk, done)
        return super().build_connector_worker_meta()

    def get_kv_connector_gauges(self) -> GaugeValues:
        inflight = self.disk.num_inflight if self.disk is not None else 0
        return {**super().get_kv_connector_gauges(), "kv_offload_disk_inflight_io": inflight}

    def shutdown(self) -> None:
        if self.disk is not None:
            self.disk.shutdown()  # running I/O ends before the CPU pool goes away
        super().shutdown()


def _merge(old: DiskDone | None, new: DiskDone) -> DiskDone:
    if old is None:
        return new
    for name in old.__struct_fields__:
        getattr(old, name).extend(getattr(new, name))
    return old
