"""NoOpConnector: a connector that moves nothing (baseline for engines and tests)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvbridge.connector.base import (
    EmptyMetadata,
    KVConnectorBase,
    KVConnectorMetadata,
    KVConnectorScheduler,
    KVConnectorWorker,
    SupportsHMA,
)
from kvbridge.connector.types import (
    BlockIds,
    FinishedRequest,
    MatchResult,
    RequestView,
    SchedulerStep,
)

if TYPE_CHECKING:
    import torch


class NoOpScheduler(KVConnectorScheduler, SupportsHMA):
    """Runs in the scheduler; matches nothing, plans nothing."""

    def get_num_new_matched_tokens(
        self, request: RequestView, num_computed_tokens: int
    ) -> MatchResult:
        return MatchResult(0, False)

    def update_state_after_alloc(
        self, request: RequestView, block_ids: BlockIds, num_external_tokens: int
    ) -> None:
        return None

    def build_connector_meta(self, step: SchedulerStep) -> KVConnectorMetadata:
        return EmptyMetadata()

    def request_finished_all_groups(
        self, request: RequestView, block_ids: BlockIds
    ) -> FinishedRequest:
        return FinishedRequest(False, None)

    def has_request_state(self, request_id: str) -> bool:
        return False


class NoOpWorker(KVConnectorWorker):
    """Runs in a worker; registers nothing."""

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        return None


class NoOpConnector(KVConnectorBase):
    """Moves nothing; every hook is a no-op."""

    scheduler_cls = NoOpScheduler
    worker_cls = NoOpWorker
