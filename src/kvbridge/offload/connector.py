"""SimpleCPUOffloadConnector: a pinned-CPU tier for prefix-cache blocks (SPEC §5)."""

from __future__ import annotations

from kvbridge.config import TransferConfig
from kvbridge.connector.base import KVConnectorBase, KVConnectorScheduler, KVConnectorWorker
from kvbridge.connector.types import KVCacheSpec
from kvbridge.offload.config import check_offload_extra, group_windows
from kvbridge.offload.disk.config import check_disk_extra
from kvbridge.offload.disk.halves import TieredOffloadScheduler, TieredOffloadWorker
from kvbridge.offload.scheduler import CPUOffloadScheduler
from kvbridge.offload.worker import CPUOffloadWorker


class SimpleCPUOffloadConnector(KVConnectorBase):
    """Keeps a CPU copy of full KV blocks so that a prefix hit survives GPU eviction.

    Extra config, vLLM's keys with vLLM's meaning: ``cpu_bytes_to_use`` (server-wide, split by
    world size; default 8 GiB), ``cpu_bytes_to_use_per_rank`` (overrides the share; a warning
    when it differs from it), ``lazy_offload`` and ``lazy_offload_min_prefix_tokens``,
    ``kv_offload_backend`` (``"cpu"`` only). kvbridge's own: ``num_cpu_blocks``,
    ``store_decode_blocks`` (default false), ``block_size`` (must match the engine),
    ``copy_strategy`` (CUDA). Unknown keys are errors naming the key.

    ``lazy_offload: true`` is accepted with one start-up warning: kvbridge's connector
    contract has no hook before the GPU pool evicts a block, so blocks are stored eagerly
    once computed. The same blocks reach the CPU tier and the same prefixes hit; the cost is
    GPU->CPU copies of blocks the GPU would have kept anyway.

    Hybrid caches (HMA): full-attention and sliding-window groups, each group's blocks stored
    and loaded for its own layers; a hit needs every full group's blocks after the local
    prefix and each sliding-window group's blocks inside the window before the hit's end.

    ``request_finished`` returns ``(False, None)`` unless a store still reads the request's
    GPU blocks: one in flight, or the finish-time flush of blocks that only the last step
    confirmed (see ``CPUOffloadScheduler``); then ``(True, None)`` until ``finished_sending``.

    Disk tier (``kv_offload_backend: "disk"``, vLLM's keys ``disk_path``,
    ``disk_capacity_bytes``, ``use_page_cache``, ``direct_io_alignment``, ``disk_buffer_slots``
    and the fs tier's ``n_read_threads`` / ``n_write_threads``; see
    ``kvbridge.offload.disk.config``): behind the CPU tier, not instead of it. Blocks stored on
    the CPU tier are written to one checksummed file per block; a lookup the disk extends reads
    them back into CPU blocks ("ask again" meanwhile), then loads them as CPU hits.
    ``disk_buffer_slots`` is accepted and has no effect (each I/O thread owns its buffers).

    Needs a layout with one region per block and layer (``KVCacheLayout.is_block_dense``) and
    prefix caching.
    """

    scheduler_cls = CPUOffloadScheduler
    worker_cls = CPUOffloadWorker
    needs_block_dense_layout = True

    @classmethod
    def check_config(cls, config: TransferConfig) -> None:
        check_offload_extra(config)

    @classmethod
    def build_scheduler(
        cls, config: TransferConfig, cache_spec: KVCacheSpec
    ) -> KVConnectorScheduler:
        if check_disk_extra(dict(config.kv_connector_extra_config)) is not None:
            return TieredOffloadScheduler(config, cache_spec)
        return super().build_scheduler(config, cache_spec)

    @classmethod
    def build_worker(cls, config: TransferConfig, cache_spec: KVCacheSpec) -> KVConnectorWorker:
        if check_disk_extra(dict(config.kv_connector_extra_config)) is not None:
            return TieredOffloadWorker(config, cache_spec)
        return super().build_worker(config, cache_spec)

    @classmethod
    def check_cache_spec(cls, config: TransferConfig, spec: KVCacheSpec) -> None:
        super().check_cache_spec(config, spec)
        group_windows(spec)  # full and sliding-window groups only
