"""Scheduler half of the MultiConnector (rules in kvbridge.connector.multi)."""

from __future__ import annotations

import dataclasses
import logging
from typing import NamedTuple

from kvbridge.config import TransferConfig
from kvbridge.connector.base import (
    ConnectorOutput,
    KVConnectorHandshakeMetadata,
    KVConnectorRole,
    KVConnectorScheduler,
    SupportsHMA,
)
from kvbridge.connector.factory import create_connector
from kvbridge.connector.gauges import MultiKVConnectorGauges, child_labels
from kvbridge.connector.multi import (
    MultiConnectorMetadata,
    MultiWorkerMetadata,
    child_configs,
    merge_transfer_params,
)
from kvbridge.connector.stats import MultiKVConnectorStats
from kvbridge.connector.types import (
    BlockIds,
    FinishedRequest,
    HandoverToken,
    KVCacheEvent,
    KVCacheSpec,
    MatchResult,
    RequestView,
    SchedulerStep,
    SupportsHandover,
)

logger = logging.getLogger(__name__)


class _Loader(NamedTuple):
    child: int  # index of the child that matched first
    load_async: bool


class MultiScheduler(KVConnectorScheduler, SupportsHMA):
    """Runs in the scheduler; owns the child scheduler halves and which child loads each request.

    HMA calls are forwarded to children that declare ``SupportsHMA``; the factory refuses a
    multi-group cache unless every child does, so single-group children only ever see one group.
    """

    def __init__(self, config: TransferConfig, cache_spec: KVCacheSpec) -> None:
        super().__init__(config, cache_spec)
        self.child_configs = child_configs(config)
        self.children: list[KVConnectorScheduler] = []
        try:
            for child in self.child_configs:
                self.children.append(create_connector(child, KVConnectorRole.SCHEDULER, cache_spec))
        except Exception:
            self.shutdown()
            raise
        self.names = [c.kv_connector for c in self.child_configs]
        self.labels = child_labels(self.names)  # the children's gauges' connector labels
        self._loader: dict[str, _Loader] = {}  # req id -> the child that won its load
        self._async_loading: dict[str, int] = {}  # req id -> loader, until finished_recving
        self._extra_async_saves: dict[str, int] = {}  # req id -> delaying children - 1

    # -- lookup and allocation --------------------------------------------------------------
    def get_handover_token(self, request: RequestView) -> HandoverToken | None:
        """The first child's handover token (children that implement ``SupportsHandover``)."""
        for child in self.children:
            if isinstance(child, SupportsHandover):
                token = child.get_handover_token(request)
                if token is not None:
                    return token
        return None

    def get_num_new_matched_tokens(
        self, request: RequestView, num_computed_tokens: int
    ) -> MatchResult:
        answers = [
            c.get_num_new_matched_tokens(request, num_computed_tokens) for c in self.children
        ]
        if any(a.num_tokens is None for a in answers):
            return MatchResult(None, False)
        for i, answer in enumerate(answers):
            if answer.num_tokens:
                self._loader[request.request_id] = _Loader(i, answer.load_async)
                return answer
        self._loader.pop(request.request_id, None)
        return MatchResult(0, False)

    def update_state_after_alloc(
        self, request: RequestView, block_ids: BlockIds, num_external_tokens: int
    ) -> None:
        req_id = request.request_id
        loader = self._loader.get(req_id)
        chosen = None if loader is None else loader.child
        if num_external_tokens and loader is None:
            raise RuntimeError(
                f"request {req_id}: {num_external_tokens} external tokens allocated but no child "
                "matched them in get_num_new_matched_tokens"
            )
        for i, child in enumerate(self.children):
            child.update_state_after_alloc(
                request, block_ids, num_external_tokens if i == chosen else 0
            )
        if num_external_tokens and loader is not None and loader.load_async:
            self._async_loading[req_id] = loader.child

    def loading_child(self, request_id: str) -> str | None:
        """Name of the child that won the load of ``request_id`` (None: no child matched)."""
        loader = self._loader.get(request_id)
        return None if loader is None else self.names[loader.child]

    def has_request_state(self, request_id: str) -> bool:
        """Whether this half or any child keeps state for ``request_id``; ``TypeError`` if a
        child cannot say."""
        mine = (self._loader, self._async_loading, self._extra_async_saves)
        if any(request_id in m for m in mine):
            return True
        for name, child in zip(self.names, self.children):
            probe = getattr(child, "has_request_state", None)
            if probe is None:
                raise TypeError(f"{name} cannot say whether it keeps state for a request")
            if probe(request_id):
                return True
        return False

    def build_connector_meta(self, step: SchedulerStep) -> MultiConnectorMetadata:
        parts = []
        for i, child in enumerate(self.children):
            parts.append(child.build_connector_meta(self._step_for_child(step, i)))
        extra, self._extra_async_saves = self._extra_async_saves, {}
        return MultiConnectorMetadata(metadata=tuple(parts), extra_async_saves=extra)

    def _step_for_child(self, step: SchedulerStep, index: int) -> SchedulerStep:
        # Hide requests another child is still loading: their blocks are not safe to store.
        hidden = {r for r, loader in self._async_loading.items() if loader != index}
        if not hidden or not any(s.request_id in hidden for s in step.scheduled):
            return step
        kept = tuple(s for s in step.scheduled if s.request_id not in hidden)
        return dataclasses.replace(step, scheduled=kept)

    def update_connector_output(self, output: ConnectorOutput) -> None:
        for req_id in output.finished_recving:
            self._async_loading.pop(req_id, None)
        parts = self._split_worker_meta(output)
        per_child = (
            output.stats.per_connector if isinstance(output.stats, MultiKVConnectorStats) else {}
        )
        for i, child in enumerate(self.children):
            child.update_connector_output(
                dataclasses.replace(
                    output, worker_meta=parts[i], stats=per_child.get(self.names[i])
                )
            )

    def _split_worker_meta(self, output: ConnectorOutput) -> list:
        meta = output.worker_meta
        if meta is None:
            return [None] * len(self.children)
        if not isinstance(meta, MultiWorkerMetadata) or len(meta.metadata) != len(self.children):
            raise TypeError(
                "MultiConnector: worker metadata must be a MultiWorkerMetadata with one entry per "
                f"child ({len(self.children)}), got {type(meta).__name__}"
            )
        return list(meta.metadata)

    # -- finish -----------------------------------------------------------------------------
    def request_finished(self, request: RequestView, block_ids: list[int]) -> FinishedRequest:
        answers = [c.request_finished(request, block_ids) for c in self.children]
        return self._combine_finished(request.request_id, answers)

    def request_finished_all_groups(
        self, request: RequestView, block_ids: BlockIds
    ) -> FinishedRequest:
        answers = []
        for name, child in zip(self.names, self.children):
            if isinstance(child, SupportsHMA):
                answers.append(child.request_finished_all_groups(request, block_ids))
            elif len(block_ids) == 1:
                answers.append(child.request_finished(request, block_ids[0]))
            else:
                raise RuntimeError(f"{name} does not support HMA but got {len(block_ids)} groups")
        return self._combine_finished(request.request_id, answers)

    def _combine_finished(self, req_id: str, answers: list[FinishedRequest]) -> FinishedRequest:
        self._loader.pop(req_id, None)
        self._async_loading.pop(req_id, None)
        delaying = sum(1 for a in answers if a.delay_free)
        if delaying > 1:
            self._extra_async_saves[req_id] = delaying - 1
        params = merge_transfer_params(
            [(name, a.kv_transfer_params) for name, a in zip(self.names, answers)]
        )
        return FinishedRequest(delaying > 0, params)

    # -- observability and shutdown ---------------------------------------------------------
    def set_xfer_handshake_metadata(
        self, metadata: dict[int, KVConnectorHandshakeMetadata]
    ) -> None:
        for child in self.children:
            child.set_xfer_handshake_metadata(metadata)

    def take_events(self) -> list[KVCacheEvent]:
        return [event for child in self.children for event in child.take_events()]

    def get_kv_connector_stats(self) -> MultiKVConnectorStats | None:
        return MultiKVConnectorStats.collect(
            (name, child.get_kv_connector_stats()) for name, child in zip(self.names, self.children)
        )

    def get_kv_connector_gauges(self) -> MultiKVConnectorGauges:
        return MultiKVConnectorGauges.collect(
            (label, child.get_kv_connector_gauges())
            for label, child in zip(self.labels, self.children)
        )

    def check_integrity(self) -> None:
        for child in self.children:
            child.check_integrity()

    def shutdown(self) -> None:
        shutdown_all(self.children)


def shutdown_all(children: list) -> None:
    """Call ``shutdown`` on every child even if some raise; re-raise the first error."""
    first: BaseException | None = None
    for child in children:
        try:
            child.shutdown()
        except Exception as e:
            logger.exception("shutdown of %s failed", type(child).__name__)
            first = first or e
    if first is not None:
        raise first
