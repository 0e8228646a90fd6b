"""SimpleCPUOffloadConnector: a pinned-CPU tier for prefix-cache blocks (SPEC §5)."""

from __future__ import annotations

from kvbridge.connector.base import KVConnectorBase
from kvbridge.offload.scheduler import CPUOffloadScheduler
from kvbridge.offload.worker import CPUOffloadWorker


class SimpleCPUOffloadConnector(KVConnectorBase):
    """Keeps a CPU copy of full KV blocks so that a prefix hit survives GPU eviction.

    Extra config: ``cpu_bytes_to_use`` (server-wide) or ``num_cpu_blocks``,
    ``store_decode_blocks`` (default false), ``block_size`` (must match the engine),
    ``lazy_offload`` (only false for now). Needs a layout with one region per block and layer
    (``KVCacheLayout.is_block_dense``) and prefix caching.
    """

    scheduler_cls = CPUOffloadScheduler
    worker_cls = CPUOffloadWorker
    needs_block_dense_layout = True
