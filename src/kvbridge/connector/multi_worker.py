"""Worker half of the MultiConnector (rules in kvbridge.connector.multi)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvbridge.config import TransferConfig
from kvbridge.connector.base import (
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorker,
)
from kvbridge.connector.factory import create_connector
from kvbridge.connector.gauges import MultiKVConnectorGauges, child_labels
from kvbridge.connector.multi import MultiConnectorMetadata, MultiWorkerMetadata, child_configs
from kvbridge.connector.multi_scheduler import shutdown_all
from kvbridge.connector.stats import MultiKVConnectorStats
from kvbridge.connector.types import FinishedTransfers, KVCacheSpec

if TYPE_CHECKING:
    import torch


class MultiWorker(KVConnectorWorker):
    """Runs in a worker; forwards every hook to the child worker halves, in child order."""

    def __init__(self, config: TransferConfig, cache_spec: KVCacheSpec) -> None:
        super().__init__(config, cache_spec)
        self.child_configs = child_configs(config)
        self.names = [c.kv_connector for c in self.child_configs]
        self.labels = child_labels(self.names)  # the children's gauges' connector labels
        self.children: list[KVConnectorWorker] = []
        try:
            for child in self.child_configs:
                self.children.append(create_connector(child, KVConnectorRole.WORKER, cache_spec))
        except Exception:
            shutdown_all(self.children)
            raise
        # req id -> reports still to swallow before the request is reported done.
        self._extra_async_saves: dict[str, int] = {}

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        for child in self.children:
            child.register_kv_caches(kv_caches)

    def bind_connector_metadata(self, metadata: KVConnectorMetadata) -> None:
        if not isinstance(metadata, MultiConnectorMetadata) or len(metadata.metadata) != len(
            self.children
        ):
            raise TypeError(
                "MultiConnector: expected MultiConnectorMetadata with one entry per child "
                f"({len(self.children)}), got {type(metadata).__name__}"
            )
        super().bind_connector_metadata(metadata)
        for req_id, extra in metadata.extra_async_saves.items():
            self._extra_async_saves[req_id] = self._extra_async_saves.get(req_id, 0) + extra
        for child, part in zip(self.children, metadata.metadata):
            child.bind_connector_metadata(part)

    def clear_connector_metadata(self) -> None:
        for child in self.children:
            child.clear_connector_metadata()
        super().clear_connector_metadata()

    def start_load_kv(self) -> None:
        for child in self.children:
            child.start_load_kv()

    def wait_for_layer_load(self, layer_name: str) -> None:
        for child in self.children:
            child.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor) -> None:
        for child in self.children:
            child.save_kv_layer(layer_name, kv_layer)

    def wait_for_save(self) -> None:
        for child in self.children:
            child.wait_for_save()

    def get_finished(self, finished_req_ids: frozenset[str]) -> FinishedTransfers:
        sending: set[str] = set()
        recving: set[str] = set()
        for child in self.children:
            done_sending, done_recving = child.get_finished(finished_req_ids)
            recving |= done_recving
            for req_id in done_sending:
                remaining = self._extra_async_saves.get(req_id, 0)
                if remaining:
                    # Another delaying child has yet to finish with these blocks.
                    if remaining == 1:
                        del self._extra_async_saves[req_id]
                    else:
                        self._extra_async_saves[req_id] = remaining - 1
                else:
                    sending.add(req_id)
        return FinishedTransfers(frozenset(sending), frozenset(recving))

    def take_failed_recving(self) -> set[str]:
        failed: set[str] = set()
        for child in self.children:
            failed |= child.take_failed_recving()
        return failed

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors: set[int] = set()
        for child in self.children:
            errors |= child.get_block_ids_with_load_errors()
        return errors

    def build_connector_worker_meta(self) -> MultiWorkerMetadata | None:
        parts = tuple(child.build_connector_worker_meta() for child in self.children)
        if all(p is None for p in parts):
            return None
        return MultiWorkerMetadata(metadata=parts)

    def get_kv_connector_stats(self) -> MultiKVConnectorStats | None:
        return MultiKVConnectorStats.collect(
            (name, child.get_kv_connector_stats()) for name, child in zip(self.names, self.children)
        )

    def get_kv_connector_gauges(self) -> MultiKVConnectorGauges:
        return MultiKVConnectorGauges.collect(
            (label, child.get_kv_connector_gauges())
            for label, child in zip(self.labels, self.children)
        )

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        for child in self.children:
            meta = child.get_handshake_metadata()
            if meta is not None:
                return meta
        return None

    def set_xfer_handshake_metadata(
        self, metadata: dict[int, KVConnectorHandshakeMetadata]
    ) -> None:
        for child in self.children:
            child.set_xfer_handshake_metadata(metadata)

    def shutdown(self) -> None:
        shutdown_all(self.children)
