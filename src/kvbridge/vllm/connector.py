"""kvbridge's connectors as vLLM ``KVConnectorBase_V1`` classes (load by module path).

vLLM builds a connector class once per role: in its scheduler process (EngineCore) and in
each worker. Each class here builds the matching kvbridge half from the same
``--kv-transfer-config`` and forwards every hook to it through a thin adapter. The class
names differ from vLLM's own ("NixlConnector", "MultiConnector"), which vLLM special-cases
whatever the module path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    SupportsHMA,
)

from kvbridge.config import ConfigError
from kvbridge.connector import base as kvb
from kvbridge.connector.factory import create_connector
from kvbridge.vllm.metrics import KVBridgePromMetrics
from kvbridge.vllm.scheduler import SchedulerAdapter
from kvbridge.vllm.spec import PREFERRED_LAYOUT, cache_spec, transfer_config
from kvbridge.vllm.wire import KVBridgeHandshake, KVBridgeStats
from kvbridge.vllm.worker import WorkerAdapter

if TYPE_CHECKING:
    from collections.abc import Iterable

    import torch
    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import PromMetric, PromMetricT
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.metrics.cache_hit_source import CacheHitSource
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request


class KVBridgeConnector(KVConnectorBase_V1, SupportsHMA):
    """One kvbridge connector inside vLLM; subclasses name which (``kvbridge_connector``).

    HMA: vLLM may run it on hybrid caches; the kvbridge factory refuses a multi-group cache
    at construction unless the kvbridge connector (every child of a MultiConnector) supports
    it, with a message naming the child.
    """

    kvbridge_connector: ClassVar[str]

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        if vllm_config.parallel_config.world_size != 1:
            raise ConfigError(
                f"{type(self).__name__}: tensor/pipeline parallel size must be 1 for now "
                f"(world size {vllm_config.parallel_config.world_size})"
            )
        self.transfer = transfer_config(vllm_config, self.kvbridge_connector)
        self.spec = cache_spec(vllm_config, kv_cache_config)
        if self.spec.num_groups > 1 and _uses_layerwise(self.transfer.kv_connector_extra_config):
            raise ConfigError(
                f"{type(self).__name__}: load_mode 'layerwise' needs a single KV cache group "
                f"(this model has {self.spec.num_groups}; vLLM cannot roll back a failed "
                "in-step load on a hybrid cache); use load_mode 'async'"
            )
        name = self.kvbridge_connector
        self._sched: SchedulerAdapter | None = None
        self._work: WorkerAdapter | None = None
        if role is KVConnectorRole.SCHEDULER:
            half = create_connector(self.transfer, kvb.KVConnectorRole.SCHEDULER, self.spec)
            self._sched = SchedulerAdapter(name, half, self.spec)
        else:
            self._work = WorkerAdapter(
                name, create_connector(self.transfer, kvb.KVConnectorRole.WORKER, self.spec)
            )

    @property
    def scheduler(self) -> SchedulerAdapter:
        if self._sched is None:
            raise RuntimeError(f"{type(self).__name__}: a scheduler hook called on a worker")
        return self._sched

    @property
    def worker(self) -> WorkerAdapter:
        if self._work is None:
            raise RuntimeError(f"{type(self).__name__}: a worker hook called on the scheduler")
        return self._work

    @property
    def half(self) -> kvb.KVConnectorScheduler | kvb.KVConnectorWorker:
        """The kvbridge half this instance drives (for tests and introspection)."""
        return self._sched.half if self._sched is not None else self.worker.half

    # -- class-level answers vLLM asks before building ------------------------------------------
    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: VllmConfig) -> str | None:
        return PREFERRED_LAYOUT

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """A layerwise CPU-tier load is ordered per layer by ``wait_for_layer_load``, which the
        replay of a full CUDA graph skips: ask vLLM for piecewise graphs then."""
        return _uses_layerwise(extra_config)

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVBridgePromMetrics:
        return KVBridgePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVBridgeStats | None:
        return KVBridgeStats(data=dict(data or {}))

    # -- worker side ------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker.register_kv_caches(kv_caches)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        self.worker.bind_connector_metadata(connector_metadata)

    def clear_connector_metadata(self) -> None:
        super().clear_connector_metadata()
        self.worker.clear_connector_metadata()

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self.worker.start_load_kv()

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.worker.wait_for_layer_load(layer_name)

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        self.worker.save_kv_layer(layer_name, kv_layer)

    def wait_for_save(self) -> None:
        self.worker.wait_for_save()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self.worker.get_finished(finished_req_ids)

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        """``get_finished``'s ids and, on a hybrid cache, the received ones whose load failed
        (``failed_recving``: how vLLM learns of them there; a single-group cache reports the
        failed blocks, ``get_block_ids_with_load_errors``, and recomputes only those)."""
        sending, recving = self.worker.get_finished(finished_req_ids)
        failed = self.worker.take_failed_recving()
        return KVConnectorTransferResults(
            finished_sending=set(sending or ()),
            finished_recving=set(recving or ()),
            failed_recving=failed if self.spec.num_groups > 1 else set(),
        )

    def get_block_ids_with_load_errors(self) -> set[int]:
        """The failed loads' blocks; none on a hybrid cache, whose block ids are not unique
        across groups (vLLM refuses them there and recomputes or fails ``failed_recving``)."""
        errors = self.worker.get_block_ids_with_load_errors()
        return errors if self.spec.num_groups == 1 else set()

    def build_connector_worker_meta(self) -> Any:
        return self.worker.build_connector_worker_meta()

    def get_handshake_metadata(self) -> KVBridgeHandshake | None:
        meta = self.worker.half.get_handshake_metadata()
        return None if meta is None else KVBridgeHandshake(meta)

    def get_kv_connector_stats(self) -> KVBridgeStats | None:
        if self._sched is not None:
            return self._sched.get_kv_connector_stats()
        return self.worker.get_kv_connector_stats()

    def shutdown(self) -> None:
        if self._work is not None:
            self._work.shutdown()
        if self._sched is not None:
            self._sched.half.shutdown()

    # -- scheduler side ---------------------------------------------------------------------
    def bind_kv_cache_manager(self, kv_cache_manager: KVCacheManager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        self.scheduler.bind_kv_cache_manager(kv_cache_manager)

    def on_new_request(self, request: Request) -> None:
        self.scheduler.on_new_request(request)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def get_external_cache_hit_sources(
        self, request: Request, num_external_tokens: int
    ) -> dict[CacheHitSource, int]:
        return self.scheduler.hit_sources(request, num_external_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self.scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self.scheduler.update_connector_output(connector_output)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler.request_finished(request, (block_ids,))

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler.request_finished(request, block_ids)

    def take_events(self) -> Iterable[KVCacheEvent]:
        return self.scheduler.take_events()

    def set_xfer_handshake_metadata(self, metadata: dict[int, Any]) -> None:
        """vLLM hands the workers' ``get_handshake_metadata`` to the scheduler instance."""
        self.scheduler.half.set_xfer_handshake_metadata(
            {rank: m.inner for rank, m in metadata.items() if isinstance(m, KVBridgeHandshake)}
        )


class KVBridgeMultiConnector(KVBridgeConnector):
    """kvbridge's MultiConnector: children under ``kv_connector_extra_config.connectors``."""

    kvbridge_connector = "MultiConnector"


class KVBridgeNixlConnector(KVBridgeConnector):
    """kvbridge's NixlConnector (prefill/decode over NIXL, with leases)."""

    kvbridge_connector = "NixlConnector"


class KVBridgeCPUOffloadConnector(KVBridgeConnector):
    """kvbridge's SimpleCPUOffloadConnector (a pinned CPU tier for prefix-cache blocks)."""

    kvbridge_connector = "SimpleCPUOffloadConnector"


def _uses_layerwise(extra: Any) -> bool:
    """Whether a connector's extra config (or a MultiConnector child's) sets layerwise loads."""
    if not isinstance(extra, dict):
        return False
    if extra.get("load_mode") == "layerwise":
        return True
    children = extra.get("connectors")
    return isinstance(children, list) and any(
        isinstance(c, dict) and _uses_layerwise(c.get("kv_connector_extra_config"))
        for c in children
    )
