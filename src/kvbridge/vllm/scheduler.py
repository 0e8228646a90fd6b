"""Runs in vLLM's scheduler process (EngineCore): vLLM's scheduler hooks -> kvbridge's.

vLLM's ``Request`` already reads as kvbridge's ``RequestView`` (request id, prompt and all
token ids, computed tokens, block hashes, kv_transfer_params), so it is passed through as is;
at its end, ``FinishedView`` adds the finish reason from vLLM's status.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_events import BlockRemoved as VllmBlockRemoved
from vllm.distributed.kv_events import BlockStored as VllmBlockStored
from vllm.distributed.kv_events import KVCacheEvent as VllmKVCacheEvent
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvbridge.connector.base import ConnectorOutput, KVConnectorScheduler, SupportsHMA
from kvbridge.connector.gauges import LabelledGauges, label_gauges, merge_labelled
from kvbridge.connector.types import (
    BlockRemoved,
    BlockStored,
    KVCacheSpec,
    ScheduledRequest,
    SchedulerStep,
)
from kvbridge.vllm.wire import KVBridgeMetadata, KVBridgeStats, KVBridgeWorkerMetadata

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

# kvbridge connector name -> the tier vLLM's metrics name for its hits.
_HIT_SOURCES = {
    "NixlConnector": CacheHitSource.P2P,
    "SimpleCPUOffloadConnector": CacheHitSource.HOST,
}


class SchedulerAdapter:
    """Drives one kvbridge scheduler half from vLLM's scheduler; owns nothing else.

    Block ids of scheduled requests are read from vLLM's KV cache manager (bound by vLLM
    before the first step), so every step passes a request's full block table, per group.
    """

    def __init__(self, name: str, half: KVConnectorScheduler, spec: KVCacheSpec) -> None:
        self.name = name
        self.half = half
        self.spec = spec
        self._manager: KVCacheManager | None = None
        self._requests: dict[str, Request] = {}  # req id -> vLLM's request, until it finishes
        self._step_id = 0
        self._worker_gauges: LabelledGauges = {}  # the worker half's last snapshot
        self._sent_gauges: LabelledGauges | None = None  # the last snapshot handed to vLLM

    def bind_kv_cache_manager(self, manager: KVCacheManager) -> None:
        self._manager = manager

    # -- per request ------------------------------------------------------------------------
    def on_new_request(self, request: Request) -> None:
        self._requests[request.request_id] = request

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        self._requests.setdefault(request.request_id, request)
        num_tokens, load_async = self.half.get_num_new_matched_tokens(
            request,  # type: ignore[arg-type]
            num_computed_tokens,
        )
        return num_tokens, bool(load_async and num_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        block_ids = tuple(list(ids) for ids in blocks.get_block_ids())
        self.half.update_state_after_alloc(request, block_ids, num_external_tokens)  # type: ignore[arg-type]

    def hit_sources(self, request: Request, num_external_tokens: int) -> dict[CacheHitSource, int]:
        if num_external_tokens == 0:
            return {}
        loader = getattr(self.half, "loading_child", None)
        name = loader(request.request_id) if loader is not None else self.name
        return {
            _HIT_SOURCES.get(name or "", CacheHitSource.EXTERNAL_UNSPECIFIED): num_external_tokens
        }

    def request_finished(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        self._requests.pop(request.request_id, None)
        view = FinishedView(request)
        if isinstance(self.half, SupportsHMA):
            done = self.half.request_finished_all_groups(view, block_ids)
        else:
            done = self.half.request_finished(view, block_ids[0])
        return done.delay_free, done.kv_transfer_params

    # -- per step ---------------------------------------------------------------------------
    def build_connector_meta(self, so: SchedulerOutput) -> KVBridgeMetadata:
        scheduled = []
        for req_id, computed, resumed in _scheduled(so):
            request = self._requests.get(req_id)
            if request is None:
                continue
            scheduled.append(
                ScheduledRequest(
                    request=request,  # type: ignore[arg-type]
                    block_ids=self._block_ids(req_id),
                    num_computed_tokens=computed,
                    num_scheduled_tokens=so.num_scheduled_tokens.get(req_id, 0),
                    resumed_from_preemption=resumed,
                )
            )
        step = SchedulerStep(
            step_id=self._step_id,
            scheduled=tuple(scheduled),
            finished_req_ids=frozenset(so.finished_req_ids),
            preempted_req_ids=frozenset(so.preempted_req_ids or ()),
        )
        self._step_id += 1
        return KVBridgeMetadata(self.half.build_connector_meta(step))

    def update_connector_output(self, out: KVConnectorOutput) -> None:
        meta = out.kv_connector_worker_meta
        stats = out.kv_connector_stats
        if isinstance(stats, KVBridgeStats) and (worker_gauges := stats.gauges()):
            self._worker_gauges = worker_gauges
        self.half.update_connector_output(
            ConnectorOutput(
                finished_sending=frozenset(out.finished_sending or ()),
                finished_recving=frozenset(out.finished_recving or ()),
                invalid_block_ids=frozenset(out.invalid_block_ids or ()),
                worker_meta=meta.inner if isinstance(meta, KVBridgeWorkerMetadata) else None,
                stats=stats.unwrap(self.name) if isinstance(stats, KVBridgeStats) else None,
            )
        )

    def take_events(self) -> Iterable[VllmKVCacheEvent]:
        for event in self.half.take_events():
            hashes = [bytes(h) for h in event.block_hashes]
            if isinstance(event, BlockStored):
                yield VllmBlockStored(
                    block_hashes=hashes,  # type: ignore[arg-type]
                    parent_block_hash=None,
                    token_ids=[],
                    block_size=event.block_size,
                    lora_id=None,
                    medium=event.medium.value,
                    lora_name=None,
                    group_idx=event.group_idx,
                )
            elif isinstance(event, BlockRemoved):
                yield VllmBlockRemoved(
                    block_hashes=hashes,  # type: ignore[arg-type]
                    medium=event.medium.value,
                    group_idx=event.group_idx,
                )

    def get_kv_connector_stats(self) -> KVBridgeStats | None:
        """This step's stats, and both halves' gauges when they changed (vLLM hands them to
        ``KVBridgePromMetrics.observe`` after the worker's, so this snapshot wins)."""
        own = label_gauges(self.half.get_kv_connector_gauges(), self.name)
        gauges = merge_labelled([own, self._worker_gauges])
        changed = gauges != self._sent_gauges
        self._sent_gauges = gauges
        stats = self.half.get_kv_connector_stats()
        return KVBridgeStats.wrap(self.name, stats, gauges if changed else None)

    def _block_ids(self, req_id: str) -> tuple[list[int], ...]:
        if self._manager is None:
            raise RuntimeError(
                "kvbridge: vLLM did not bind its KV cache manager before the first step"
            )
        return tuple(list(ids) for ids in self._manager.get_block_ids(req_id))


class FinishedView:
    """vLLM's ``Request`` as kvbridge's ``RequestView`` once it ended: read through, plus
    ``finish_reason`` from vLLM's status ("length", "stop", "abort", "error", ...)."""

    def __init__(self, request: Request) -> None:
        self._request = request

    @property
    def finish_reason(self) -> str | None:
        reason = self._request.get_finished_reason()
        return None if reason is None else str(reason)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


def _scheduled(so: SchedulerOutput) -> Iterable[tuple[str, int, bool]]:
    """``(request id, tokens computed before this step, resumed)`` of every scheduled request."""
    for new in so.scheduled_new_reqs:
        yield new.req_id, new.num_computed_tokens, False
    cached = so.scheduled_cached_reqs
    for i, req_id in enumerate(cached.req_ids):
        yield req_id, cached.num_computed_tokens[i], req_id in cached.resumed_req_ids
