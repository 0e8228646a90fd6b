"""Runs in a vLLM worker process: vLLM's worker hooks -> kvbridge's worker half."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from kvbridge.connector.base import KVConnectorWorker
from kvbridge.connector.gauges import LabelledGauges, label_gauges
from kvbridge.vllm.wire import KVBridgeMetadata, KVBridgeStats, KVBridgeWorkerMetadata

if TYPE_CHECKING:
    import torch


class WorkerAdapter:
    """Drives one kvbridge worker half from vLLM's model runner; owns nothing else.

    vLLM binds metadata before the forward and clears it after collecting results; an async
    load may be started after the forward (vLLM does so unless the step has a synchronous
    load), which kvbridge's halves allow: their loads never feed the step that starts them.
    """

    def __init__(self, name: str, half: KVConnectorWorker) -> None:
        self.name = name
        self.half = half
        self._sent_gauges: LabelledGauges | None = None  # the last snapshot handed to vLLM

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.half.register_kv_caches(kv_caches)

    def bind_connector_metadata(self, metadata: KVConnectorMetadata) -> None:
        if not isinstance(metadata, KVBridgeMetadata):
            raise TypeError(
                f"kvbridge worker: expected KVBridgeMetadata, got {type(metadata).__name__}"
            )
        self.half.bind_connector_metadata(metadata.inner)

    def clear_connector_metadata(self) -> None:
        self.half.clear_connector_metadata()

    def start_load_kv(self) -> None:
        self.half.start_load_kv()

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.half.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor) -> None:
        self.half.save_kv_layer(layer_name, kv_layer)

    def wait_for_save(self) -> None:
        self.half.wait_for_save()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        done = self.half.get_finished(frozenset(finished_req_ids))
        return set(done.sending) or None, set(done.recving) or None

    def take_failed_recving(self) -> set[str]:
        return set(self.half.take_failed_recving())

    def get_block_ids_with_load_errors(self) -> set[int]:
        return set(self.half.get_block_ids_with_load_errors())

    def build_connector_worker_meta(self) -> KVBridgeWorkerMetadata | None:
        meta = self.half.build_connector_worker_meta()
        return None if meta is None else KVBridgeWorkerMetadata(meta)

    def get_kv_connector_stats(self) -> KVBridgeStats | None:
        """This step's stats, and the half's gauges when they changed (an idle step sends
        nothing, so vLLM still sees an empty output)."""
        gauges = label_gauges(self.half.get_kv_connector_gauges(), self.name)
        changed = gauges != self._sent_gauges
        self._sent_gauges = gauges
        stats = self.half.get_kv_connector_stats()
        return KVBridgeStats.wrap(self.name, stats, gauges if changed else None)

    def shutdown(self) -> None:
        self.half.shutdown()
