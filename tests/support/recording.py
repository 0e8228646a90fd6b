"""Recording child connectors for MultiConnector tests, loaded via kv_connector_module_path.

Behaviour is set per child in ``kv_connector_extra_config``:
``match`` (int, or None = "ask again"), ``load_async`` (bool), ``delay_free`` (bool),
``params`` (dict returned by request_finished), ``fail_shutdown`` (bool), ``layout`` (str).
Every instance appends to the module-level ``INSTANCES`` so a test can inspect the children the
MultiConnector built.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from kvbridge.connector.base import (
    ConnectorOutput,
    KVConnectorBase,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorScheduler,
    KVConnectorWorker,
    KVConnectorWorkerMetadata,
    SupportsHMA,
)
from kvbridge.connector.stats import KVConnectorStats
from kvbridge.connector.types import (
    BlockIds,
    FinishedRequest,
    FinishedTransfers,
    KVCacheLayout,
    MatchResult,
    RequestView,
    SchedulerStep,
)

INSTANCES: list[Any] = []


class RecMeta(KVConnectorMetadata):
    owner: str
    step_id: int
    scheduled: list[str]


class RecWorkerMeta(KVConnectorWorkerMetadata):
    owner: str


class RecHandshake(KVConnectorHandshakeMetadata):
    owner: str


class RecScheduler(KVConnectorScheduler):
    """Runs in the scheduler; records every call and answers as configured."""

    def __init__(self, config, cache_spec) -> None:  # type: ignore[no-untyped-def]
        super().__init__(config, cache_spec)
        self.calls: list[tuple[str, Any]] = []
        INSTANCES.append(self)

    @property
    def name(self) -> str:
        return str(self.config.extra("name", self.config.kv_connector))

    def get_num_new_matched_tokens(
        self, request: RequestView, num_computed_tokens: int
    ) -> MatchResult:
        self.calls.append(("match", request.request_id))
        return MatchResult(self.config.extra("match", 0), bool(self.config.extra("load_async")))

    def update_state_after_alloc(
        self, request: RequestView, block_ids: BlockIds, num_external_tokens: int
    ) -> None:
        self.calls.append(("alloc", (request.request_id, block_ids, num_external_tokens)))

    def build_connector_meta(self, step: SchedulerStep) -> RecMeta:
        scheduled = [s.request_id for s in step.scheduled]
        self.calls.append(("meta", step.step_id))
        return RecMeta(owner=self.name, step_id=step.step_id, scheduled=scheduled)

    def update_connector_output(self, output: ConnectorOutput) -> None:
        self.calls.append(("output", output))

    def request_finished(self, request: RequestView, block_ids: list[int]) -> FinishedRequest:
        self.calls.append(("finished", (request.request_id, block_ids)))
        return FinishedRequest(bool(self.config.extra("delay_free")), self.config.extra("params"))

    def take_events(self) -> list:
        return []

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        return KVConnectorStats(data={"calls": len(self.calls)})

    def shutdown(self) -> None:
        self.calls.append(("shutdown", None))
        if self.config.extra("fail_shutdown"):
            raise RuntimeError(f"{self.name} failed to shut down")


class RecHMAScheduler(RecScheduler, SupportsHMA):
    """A recording scheduler half that handles several cache groups."""

    def request_finished_all_groups(
        self, request: RequestView, block_ids: BlockIds
    ) -> FinishedRequest:
        self.calls.append(("finished_all_groups", (request.request_id, block_ids)))
        return FinishedRequest(bool(self.config.extra("delay_free")), self.config.extra("params"))


class RecWorker(KVConnectorWorker):
    """Runs in a worker; records calls; a test decides when sends/receives finish."""

    def __init__(self, config, cache_spec) -> None:  # type: ignore[no-untyped-def]
        super().__init__(config, cache_spec)
        self.calls: list[tuple[str, Any]] = []
        self.bound: list[KVConnectorMetadata] = []
        self.done_sending: set[str] = set()
        self.done_recving: set[str] = set()
        self.load_errors: set[int] = set()
        self.failed_recving: set[str] = set()
        INSTANCES.append(self)

    @property
    def name(self) -> str:
        return str(self.config.extra("name", self.config.kv_connector))

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.calls.append(("register", sorted(kv_caches)))

    def bind_connector_metadata(self, metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(metadata)
        self.bound.append(metadata)
        self.calls.append(("bind", metadata))

    def start_load_kv(self) -> None:
        self.calls.append(("start_load", None))

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.calls.append(("wait_layer", layer_name))

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor) -> None:
        self.calls.append(("save_layer", layer_name))

    def wait_for_save(self) -> None:
        self.calls.append(("wait_save", None))

    def get_finished(self, finished_req_ids: frozenset[str]) -> FinishedTransfers:
        sending = frozenset(r for r in self.done_sending if r in finished_req_ids)
        recving = frozenset(self.done_recving)
        self.done_sending -= sending
        self.done_recving.clear()
        return FinishedTransfers(sending, recving)

    def take_failed_recving(self) -> set[str]:
        failed, self.failed_recving = self.failed_recving, set()
        return failed

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self.load_errors = self.load_errors, set()
        return errors

    def build_connector_worker_meta(self) -> RecWorkerMeta | None:
        return RecWorkerMeta(owner=self.name) if self.config.extra("worker_meta") else None

    def get_handshake_metadata(self) -> RecHandshake | None:
        if self.config.extra("handshake"):
            return RecHandshake(owner=self.name)
        return None

    def shutdown(self) -> None:
        self.calls.append(("shutdown", None))
        if self.config.extra("fail_shutdown"):
            raise RuntimeError(f"{self.name} failed to shut down")


class Recording(KVConnectorBase):
    """Records calls; single-group only."""

    scheduler_cls = RecScheduler
    worker_cls = RecWorker

    @classmethod
    def get_required_kv_layout(cls, config=None):  # type: ignore[no-untyped-def]
        layout = config.extra("layout") if config is not None else None
        return KVCacheLayout(layout) if layout else None


class RecordingHMA(Recording):
    """Records calls; handles hybrid caches."""

    scheduler_cls: ClassVar[type[KVConnectorScheduler]] = RecHMAScheduler
