"""The lease board over real NIXL/UCX, two processes: a consumer lands a READ while the
producer's side channel answers no lease question (``ProducerProcess.mute``: its thread
waits), so only the one-sided READs of the blocks and of the board word prove the lease held.
Control: a consumer that reads no board waits for the answer, which comes once the mute ends.

The producer is ``kvbridge bench nixl``'s (a real ``NixlWorker`` in a spawned process). Not
a stopped process: on loopback NIXL completes a READ only after flushing the endpoint, which
needs the producer's UCX progress thread (C, no GIL) to run; its Python threads need not.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from kvbridge.bench.nixl_peer import SEED, ProducerProcess, kv_caches, make_spec, nixl_config
from kvbridge.bench.nixl_peer import recv_spec as bench_recv_spec
from kvbridge.connector.base import KVConnectorRole, KVConnectorWorker
from kvbridge.connector.factory import create_connector
from kvbridge.connector.stats import KVConnectorStats
from kvbridge.nixl import stats as keys
from kvbridge.nixl.metadata import NixlConnectorMetadata, RecvSpec
from support.nixl_marks import needs_nixl

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90), needs_nixl]

LAYERS, BLOCKS, BLOCK_KIB = 2, 4, 8
IDS = [0, 2, 4, 6]
SPEC = make_spec(LAYERS, BLOCKS, BLOCK_KIB)
MUTE_S = 4.0


@pytest.fixture
def producer() -> Iterator[ProducerProcess]:
    p = ProducerProcess(LAYERS, BLOCKS, BLOCK_KIB)
    try:
        yield p
    finally:
        p.stop()


def consumer(engine_id: str, **extra: Any) -> tuple[KVConnectorWorker, dict[str, torch.Tensor]]:
    worker = create_connector(
        nixl_config("kv_consumer", engine_id, **extra), KVConnectorRole.WORKER, SPEC
    )
    cache = kv_caches(SPEC, None)
    worker.register_kv_caches(cache)
    return worker, cache


def start(worker: KVConnectorWorker, spec: RecvSpec) -> None:
    worker.bind_connector_metadata(NixlConnectorMetadata(reqs_to_recv={spec.request_id: spec}))
    worker.start_load_kv()
    worker.clear_connector_metadata()


def finished(worker: KVConnectorWorker, rid: str, within_s: float) -> bool:
    """Step ``worker`` (empty metadata) until ``rid`` finished receiving, for ``within_s``."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        worker.bind_connector_metadata(NixlConnectorMetadata())
        worker.start_load_kv()
        done = rid in worker.get_finished(frozenset()).recving
        worker.clear_connector_metadata()
        if done:
            assert not worker.get_block_ids_with_load_errors()
            return True
        time.sleep(0.001)
    return False


def stats_of(worker: KVConnectorWorker) -> dict[str, Any]:
    taken = worker.get_kv_connector_stats()
    return dict(taken.data) if isinstance(taken, KVConnectorStats) else {}


def read_right(cache: dict[str, torch.Tensor]) -> bool:
    want = kv_caches(SPEC, SEED)
    return all(torch.equal(cache[name][IDS], want[name][IDS]) for name in want)


def test_a_read_lands_on_the_board_while_the_producer_answers_no_lease_question(
    producer: ProducerProcess,
) -> None:
    specs = {rid: bench_recv_spec(rid, IDS, producer.port) for rid in ("b-0", "b-1", "q-0", "q-1")}
    producer.hold(list(specs), IDS)
    board, board_cache = consumer("board-consumer")
    asker, asker_cache = consumer("asking-consumer", lease_board_slots=0)
    try:
        for worker, rid in ((board, "b-0"), (asker, "q-0")):  # handshakes, producer running
            start(worker, specs[rid])
            assert finished(worker, rid, 30.0)
            stats_of(worker)
        for t in (board_cache, asker_cache):
            for tensor in t.values():
                tensor.zero_()
        producer.mute(MUTE_S)
        muted_until = time.monotonic() + MUTE_S
        start(board, specs["b-1"])
        assert finished(board, "b-1", MUTE_S / 2)  # no answer came: landed on the board
        assert read_right(board_cache)
        stats = stats_of(board)
        assert stats[keys.BOARD_CONFIRMS] == 1 and keys.BOARD_MISSES not in stats
        assert keys.CONFIRMS_WITH_READ not in stats and keys.CONFIRM_TIME not in stats
        start(asker, specs["q-1"])  # control: the READ ends, then it waits for the answer
        assert not finished(asker, "q-1", muted_until - time.monotonic() - 0.5)
        assert finished(asker, "q-1", 30.0) and read_right(asker_cache)
        stats = stats_of(asker)
        assert keys.BOARD_CONFIRMS not in stats and keys.BOARD_READ_TIME not in stats
        assert producer.wait_released(len(specs), timeout_s=10.0) == len(specs)
    finally:
        board.shutdown()
        asker.shutdown()
