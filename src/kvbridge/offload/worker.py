"""CPUOffloadWorker: runs the scheduler's copy plans against the registered KV tensors."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvbridge.config import ConfigError, TransferConfig
from kvbridge.connector.base import KVConnectorMetadata, KVConnectorWorker
from kvbridge.connector.gauges import GaugeValues
from kvbridge.connector.layout import block_rows
from kvbridge.connector.stats import KVConnectorStats
from kvbridge.connector.types import FinishedTransfers, KVCacheSpec
from kvbridge.copy.backend import (
    AllDone,
    CopyBackend,
    CopyHandle,
    copy_backend_class,
    layer_chunks,
)
from kvbridge.offload.config import parse_offload_config
from kvbridge.offload.metadata import CPUOffloadMetadata, CPUOffloadWorkerMetadata, TransferJob

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# load_mode "layerwise": the smallest chunk of layers with its own completion event (a small
# load is not split into copies too short to run at PCIe speed).
LAYER_CHUNK_BYTES = 8 << 20


@dataclass
class _Batch:
    """All loads or all stores of one group in one step, launched together."""

    is_load: bool
    jobs: list[TransferJob]
    handle: CopyHandle | None  # None: the launch itself failed
    started: float
    nbytes: int
    in_step: bool = False  # a layerwise load: its request computes in the launching step
    unwaited: bool = False  # a layer of it was never waited for: the forward may have raced


class CPUOffloadWorker(KVConnectorWorker):
    """Runs in a worker; owns the CPU pool tensors, the copy backends and in-flight batches.

    Loads launch in ``start_load_kv`` and stores in ``wait_for_save`` (after the forward),
    one batch per KV cache group and direction, each through the backend of that group's
    layers; they complete asynchronously and are polled in ``get_finished``. A request is
    reported in ``finished_recving`` once all its load jobs ended (failed blocks in
    ``get_block_ids_with_load_errors``), and, if the scheduler listed it in
    ``report_when_done``, once in ``finished_sending`` when none of its stores is in flight.
    On a hybrid cache the groups share the CPU memory of a block id, layer slot by slot (a
    CPU block belongs to one group at a time, as a GPU block does).

    With ``load_mode: "layerwise"`` the scheduler admits a hit to compute in the step that
    loads it: ``start_load_kv`` launches the loads in chunks of layers, each with its own
    completion, and ``wait_for_layer_load`` orders a layer's compute after its chunk only (on
    CUDA the compute stream waits on an event, the host never blocks).
    """

    def __init__(self, config: TransferConfig, cache_spec: KVCacheSpec) -> None:
        super().__init__(config, cache_spec)
        self.offload = parse_offload_config(config, cache_spec)
        self.backends: list[CopyBackend] = []  # group -> backend over the group's layers
        self._group_names: list[list[str]] = []  # group -> its layer names, in backend order
        self._layer_ready: dict[str, CopyHandle] = {}  # layer -> its chunk of a layerwise load
        self._layer_batch: dict[str, _Batch] = {}  # layer -> the layerwise batch loading it
        self._new_layers: list[str] = []  # registered by the launch in progress
        self._waited: set[str] = set()  # layers this step's forward waited for
        self._group_bytes: list[int] = []  # group -> bytes of one block of its layers
        self._inflight: list[_Batch] = []
        self._req_loads: dict[str, set[int]] = {}  # req id -> launched or pending load ids
        self._req_stores: dict[str, set[int]] = {}  # req id -> launched or pending store ids
        self._report_when_done: set[str] = set()
        self._pending_loads: list[TransferJob] = []  # bound this step, not launched yet
        self._pending_stores: list[TransferJob] = []
        self._recving: set[str] = set()
        self._load_errors: set[int] = set()
        self._failed_recving: set[str] = set()  # an async load job of theirs failed
        self._done = CPUOffloadWorkerMetadata()
        self._stats = KVConnectorStats()

    # -- start-up -------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self.backends:
            raise RuntimeError("CPUOffloadWorker: register_kv_caches called twice")
        if not kv_caches:
            raise ValueError("CPUOffloadWorker: no KV cache layers registered")
        rows = {n: block_rows(self.cache_spec, n, t) for n, t in kv_caches.items()}
        first = next(iter(rows.values()))
        if any(t.dtype != first.dtype or t.device != first.device for t in rows.values()):
            raise ValueError("CPUOffloadWorker: all KV cache layers must share dtype and device")
        self._group_names = self._group_layer_names(rows)
        groups = [[rows[n] for n in names] for names in self._group_names]
        cls = copy_backend_class(first.device.type, user="CPUOffloadWorker")
        try:  # one CPU tensor per layer slot; slot j serves layer j of every group
            # block-major: a CPU block's layers are one range, so a scattered id is one copy
            slots = cls.allocate_cpu_layers(
                max(groups, key=len), self.offload.num_cpu_blocks, block_major=True
            )
        except RuntimeError as e:
            raise ConfigError(
                f"kv_connector_extra_config.cpu_bytes_to_use: cannot allocate "
                f"{self.offload.num_cpu_blocks} CPU blocks ({e}); lower it"
            ) from e
        try:
            for layers in groups:
                self.backends.append(cls(layers, slots[: len(layers)], self.offload.copy_strategy))
        except Exception:
            self.shutdown()
            raise
        per_layer = self.cache_spec.block_bytes_per_layer
        self._group_bytes = [per_layer * len(layers) for layers in groups]
        logger.info(
            "CPU offload: %d blocks (%.2f GiB) for %d layers in %d group(s), %s copy backend",
            self.offload.num_cpu_blocks,
            self.offload.num_cpu_blocks * per_layer * len(slots) / 2**30,
            len(rows),
            len(groups),
            type(self.backends[0]).__name__,
        )

    def _group_layer_names(self, rows: dict[str, torch.Tensor]) -> list[list[str]]:
        """Each group's layer names, in the spec's order (every layer on a single-group cache)."""
        spec = self.cache_spec
        if spec.num_groups == 1:
            return [list(rows)]
        grouped: list[list[str]] = []
        for i, group in enumerate(spec.groups):
            if not group.layer_names:
                raise ConfigError(f"cache_spec.groups[{i}].layer_names: group has no layers")
            missing = [n for n in group.layer_names if n not in rows]
            if missing:
                raise ConfigError(
                    f"cache_spec.groups[{i}].layer_names: layer {missing[0]!r} of group "
                    f"{group.name!r} has no registered KV cache"
                )
            grouped.append(list(group.layer_names))
        named = {n for g in spec.groups for n in g.layer_names}
        stray = [n for n in rows if n not in named]
        if stray:
            raise ConfigError(
                f"kv_caches[{stray[0]!r}]: the layer is in no KV cache group of the cache spec"
            )
        return grouped

    @property
    def backend(self) -> CopyBackend | None:
        """The copy backend of group 0 (the only one on a single-group cache)."""
        return self.backends[0] if self.backends else None

    @backend.setter
    def backend(self, value: CopyBackend | None) -> None:
        if value is None:
            self.backends = []
        elif self.backends:
            self.backends[0] = value
        else:
            self.backends.append(value)

    # -- per step -------------------------------------------------------------------------
    def bind_connector_metadata(self, metadata: KVConnectorMetadata) -> None:
        if not isinstance(metadata, CPUOffloadMetadata):
            raise TypeError(
                f"CPUOffloadWorker: expected CPUOffloadMetadata, got {type(metadata).__name__}"
            )
        super().bind_connector_metadata(metadata)
        self._report_when_done.update(metadata.report_when_done)
        self._pending_loads = list(metadata.loads)
        self._pending_stores = list(metadata.stores)
        for job in metadata.loads:
            self._req_loads.setdefault(job.req_id, set()).add(job.job_id)
        for job in metadata.stores:
            self._req_stores.setdefault(job.req_id, set()).add(job.job_id)

    def start_load_kv(self) -> None:
        self._launch_pending(loads=True, stores=False)

    def wait_for_layer_load(self, layer_name: str) -> None:
        handle = self._layer_ready.get(layer_name)  # kept: a second stream may wait too
        if handle is None:
            return
        self._waited.add(layer_name)
        try:
            handle.order_before_current()
        except Exception:  # the batch's poll reports the failure (the step rolls back)
            logger.exception("CPU offload: layerwise load of %s failed", layer_name)

    def wait_for_save(self) -> None:
        self._settle_unwaited()
        self._launch_pending(loads=True, stores=True)

    def _settle_unwaited(self) -> None:
        """A layer whose chunk the forward never waited for (an engine that skips the hook, a
        replayed full CUDA graph) may have read its blocks before they landed: order what
        follows after the copies, and fail the batch so the step's result is recomputed."""
        ordered: set[int] = set()
        for name, handle in self._layer_ready.items():
            if name in self._waited:
                continue
            batch = self._layer_batch.get(name)
            if batch is not None and not batch.unwaited:
                batch.unwaited = True
                logger.warning(
                    "CPU offload: layer %s of a layerwise load was never waited for "
                    "(wait_for_layer_load); recomputing its request",
                    name,
                )
            if id(handle) not in ordered:
                ordered.add(id(handle))
                try:
                    handle.order_before_current()
                except Exception:
                    logger.exception("CPU offload: layerwise load of %s failed", name)
        self._layer_ready.clear()
        self._layer_batch.clear()
        self._waited.clear()

    def get_finished(self, finished_req_ids: frozenset[str]) -> FinishedTransfers:
        self._launch_pending(loads=True, stores=True)
        self._poll()
        sending = {r for r in self._report_when_done if not self._req_stores.get(r)}
        self._report_when_done -= sending
        recving, self._recving = self._recving, set()
        return FinishedTransfers(frozenset(sending), frozenset(recving))

    def take_failed_recving(self) -> set[str]:
        failed, self._failed_recving = self._failed_recving, set()
        return failed

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def build_connector_worker_meta(self) -> CPUOffloadWorkerMetadata | None:
        if self._done.is_empty():
            return None
        done, self._done = self._done, CPUOffloadWorkerMetadata()
        return done

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        return self._stats.take()

    def shutdown(self) -> None:
        for batch in self._inflight:
            if batch.handle is not None:
                try:
                    batch.handle.wait()
                except Exception:
                    logger.exception("CPU offload: copy failed during shutdown")
        self._inflight = []
        backends, self.backends = self.backends, []
        for backend in backends:
            backend.shutdown()

    @property
    def num_inflight_jobs(self) -> int:
        return sum(len(b.jobs) for b in self._inflight)

    def get_kv_connector_gauges(self) -> GaugeValues:
        return {"kv_offload_num_inflight_copies": self.num_inflight_jobs}

    # -- helpers --------------------------------------------------------------------------
    def _launch_pending(self, *, loads: bool, stores: bool) -> None:
        if loads and self._pending_loads:
            jobs, self._pending_loads = self._pending_loads, []
            for group_jobs in _by_group(jobs):
                self._launch(group_jobs, is_load=True)
        if stores and self._pending_stores:
            jobs, self._pending_stores = self._pending_stores, []
            for group_jobs in _by_group(jobs):
                self._launch(group_jobs, is_load=False)

    def _launch(self, jobs: list[TransferJob], *, is_load: bool) -> None:
        """Launch jobs of one group as one batch on that group's backend (a layerwise load in
        chunks of layers, each layer's chunk noted for ``wait_for_layer_load``)."""
        group = jobs[0].group
        gpu_ids = [b for job in jobs for b in job.gpu_block_ids]
        cpu_ids = [b for job in jobs for b in job.cpu_block_ids]
        started = time.perf_counter()
        handle: CopyHandle | None = None
        nbytes = 0
        in_step = is_load and self.offload.load_mode == "layerwise"
        try:
            if not 0 <= group < len(self.backends):
                raise RuntimeError(
                    f"CPUOffloadWorker: no copy backend for group {group} (register_kv_caches "
                    f"registered {len(self.backends)})"
                )
            nbytes = len(gpu_ids) * self._group_bytes[group]
            backend = self.backends[group]
            if not is_load:
                handle = backend.store(gpu_ids, cpu_ids)
            elif in_step:
                handle = self._launch_layerwise(group, cpu_ids, gpu_ids, nbytes)
            else:
                handle = backend.load(cpu_ids, gpu_ids)
        except Exception:
            logger.exception(
                "CPU offload: launching %d %s job(s) failed", len(jobs), _kind(is_load)
            )
        batch = _Batch(is_load, jobs, handle, started, nbytes, in_step)
        for name in self._new_layers:
            self._layer_batch[name] = batch
        self._new_layers = []
        if handle is None:
            self._finish(batch, ok=False)
        else:
            self._inflight.append(batch)

    def _launch_layerwise(
        self, group: int, cpu_ids: list[int], gpu_ids: list[int], nbytes: int
    ) -> CopyHandle:
        names = self._group_names[group]
        chunks = layer_chunks(len(names), nbytes // len(names), LAYER_CHUNK_BYTES)
        handles = self.backends[group].load_layers(cpu_ids, gpu_ids, chunks)
        for (lo, hi), handle in zip(chunks, handles, strict=True):
            for name in names[lo:hi]:
                self._layer_ready[name] = handle
                self._new_layers.append(name)
        return AllDone(list({id(h): h for h in handles}.values()))

    def _poll(self) -> None:
        pending: list[_Batch] = []
        for batch in self._inflight:
            if batch.handle is None:  # never queued: failed launches finish at once
                continue
            try:
                done = batch.handle.done()
            except Exception:
                logger.exception("CPU offload: %s copy failed", _kind(batch.is_load))
                self._finish(batch, ok=False)
                continue
            if done:
                self._finish(batch, ok=not batch.unwaited)
            else:
                pending.append(batch)
        self._inflight = pending

    def _finish(self, batch: _Batch, *, ok: bool) -> None:
        ids = [job.job_id for job in batch.jobs]
        if batch.is_load:
            (self._done.completed_loads if ok else self._done.failed_loads).extend(ids)
        else:
            (self._done.completed_stores if ok else self._done.failed_stores).extend(ids)
        for job in batch.jobs:
            if batch.is_load and not ok:
                self._load_errors.update(job.gpu_block_ids)
                if not batch.in_step:  # an in-step load's request is not in finished_recving
                    self._failed_recving.add(job.req_id)
            pending = (self._req_loads if batch.is_load else self._req_stores).get(job.req_id)
            if pending is not None:
                pending.discard(job.job_id)
            if pending:
                continue
            if batch.is_load:  # the request's last load job: every group is in place
                self._req_loads.pop(job.req_id, None)
                if not batch.in_step:  # an async load's request resumes
                    self._recving.add(job.req_id)
            else:
                self._req_stores.pop(job.req_id, None)
        direction = "cpu_to_gpu" if batch.is_load else "gpu_to_cpu"
        if ok:
            self._stats.incr(f"{direction}_bytes", batch.nbytes)
            self._stats.observe(f"{direction}_time_s", time.perf_counter() - batch.started)
        else:
            self._stats.incr(f"{direction}_failed_jobs", len(batch.jobs))


def _kind(is_load: bool) -> str:
    return "load" if is_load else "store"


def _by_group(jobs: list[TransferJob]) -> list[list[TransferJob]]:
    """Jobs split by KV cache group, groups in first-seen order."""
    groups: dict[int, list[TransferJob]] = {}
    for job in jobs:
        groups.setdefault(job.group, []).append(job)
    return list(groups.values())
