"""One worker-side step of the connector contract (SPEC §1), for engines, tests and benches."""

from __future__ import annotations

from collections.abc import Callable

from kvbridge.connector.base import ConnectorOutput, KVConnectorMetadata, KVConnectorWorker


def run_worker_step(
    worker: KVConnectorWorker,
    metadata: KVConnectorMetadata,
    finished_req_ids: frozenset[str] = frozenset(),
    forward: Callable[[], object] | None = None,
) -> ConnectorOutput:
    """Bind, start loads, run ``forward`` (which calls the per-layer hooks), wait for saves,
    collect what finished; the metadata is cleared even if a hook raises."""
    worker.bind_connector_metadata(metadata)
    try:
        worker.start_load_kv()
        if forward is not None:
            forward()
        worker.wait_for_save()
        done = worker.get_finished(finished_req_ids)
        return ConnectorOutput(
            finished_sending=frozenset(done.sending),
            finished_recving=frozenset(done.recving),
            invalid_block_ids=frozenset(worker.get_block_ids_with_load_errors()),
            worker_meta=worker.build_connector_worker_meta(),
            stats=worker.get_kv_connector_stats(),
        )
    finally:
        worker.clear_connector_metadata()
