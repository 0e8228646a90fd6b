"""500 producer engines handshake with one consumer, serve it a READ each, and exit.

Each producer is a real ``NixlWorker`` with its own side channel (zmq on 127.0.0.1), holding
one request's blocks under a lease; the NIXL agents are a ``FakeFabric``'s, so READs copy the
producer's bytes into the consumer's cache. The consumer worker lives through all of them: it
handshakes each, reads, and must let go of every exited producer (agent, dlist, side-channel
watch) by itself, with its memory bounded. vLLM #58063 is the single-peer version of this.
"""

from __future__ import annotations

import gc
import logging
import os
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import pytest
import torch

from kvbridge.config import TransferConfig
from kvbridge.connector.types import KVCacheSpec
from kvbridge.nixl.fake_fabric import FabricNixlWrapper, FakeFabric
from kvbridge.nixl.metadata import NixlConnectorMetadata, RecvSpec, SendSpec
from kvbridge.nixl.transport import LiveCounts
from kvbridge.nixl.worker import NixlWorker

logger = logging.getLogger(__name__)

SPEC = KVCacheSpec(
    block_size=4, num_blocks=16, num_layers=2, num_kv_heads=2, head_dim=4, dtype="float32"
)
PRODUCERS = 500
WAVE = 10  # producers alive (and attached) at once
WARM_UP = 20  # producers before the RSS baseline: allocator arenas, thread pools, zmq
RSS_BUDGET_MIB = 20.0


def _config(role: str, engine_id: str, fabric: FakeFabric) -> TransferConfig:
    extra = {"nixl_wrapper": fabric.wrapper, "side_channel_port": 0, "kv_lease_duration_s": 30}
    return TransferConfig.from_dict(
        {
            "kv_connector": "NixlConnector",
            "kv_role": role,
            "engine_id": engine_id,
            "kv_connector_extra_config": extra,
        }
    )


def _producer(engine_id: str, fabric: FakeFabric, fill: float) -> Producer:
    worker = NixlWorker(_config("kv_producer", engine_id, fabric), SPEC)
    cache = _cache(fill)  # kept alive with the worker, as an engine keeps its cache
    worker.register_kv_caches(cache)
    return Producer(worker, cache)


def _cache(fill: float) -> dict[str, torch.Tensor]:
    shape = (SPEC.num_blocks, 2, SPEC.block_size, SPEC.num_kv_heads, SPEC.head_dim)
    return {f"layers.{i}": torch.full(shape, fill) for i in range(SPEC.num_layers)}


def _step(
    worker: NixlWorker, meta: NixlConnectorMetadata, finished: frozenset[str] = frozenset()
) -> tuple[frozenset[str], set[int]]:
    """One engine step of ``worker``: (requests done receiving, blocks whose load failed)."""
    worker.bind_connector_metadata(meta)
    worker.start_load_kv()
    _, recving = worker.get_finished(finished)
    errors = worker.get_block_ids_with_load_errors()
    worker.clear_connector_metadata()
    return recving, errors


def _wait(predicate: Callable[[], bool], timeout_s: float, poll: Callable[[], object]) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout_s}s"
        poll()
        time.sleep(0.002)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / (1 << 20)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Producer(NamedTuple):
    worker: NixlWorker
    cache: dict[str, torch.Tensor]


@dataclass
class Churn:
    consumer: NixlWorker
    rss_mib: list[float]  # after the warm-up, then after all producers left
    fds: list[int]
    seconds: float
    reads: int


def _serve_wave(consumer: NixlWorker, cache: dict[str, torch.Tensor], fabric: FakeFabric,
                first: int) -> int:  # fmt: skip
    """Start producers ``first``.. (one wave), each holding a request's blocks; the consumer
    reads one block of each into its block j + 1; then they all exit. READs that landed."""
    idle = NixlConnectorMetadata()
    ids = range(first, min(first + WAVE, PRODUCERS))
    wave = {f"prefill-{i}": _producer(f"prefill-{i}", fabric, float(i + 1)) for i in ids}
    send = SendSpec(request_id="p", num_blocks=3, lease_duration_s=30.0, abort_timeout_s=60.0)
    ports = {engine_id: p.worker.side_channel_port for engine_id, p in wave.items()}
    assert None not in ports.values()
    for p in wave.values():
        _step(p.worker, NixlConnectorMetadata(reqs_to_send={"p": send}), frozenset({"p"}))
    recvs = {
        f"d-{engine_id}": RecvSpec(
            request_id=f"d-{engine_id}",
            local_block_ids=([j + 1],),
            remote_engine_id=engine_id,
            remote_host="127.0.0.1",
            remote_port=ports[engine_id] or 0,
            remote_block_ids=([2],),
            remote_request_id="p",
        )
        for j, (engine_id, p) in enumerate(wave.items())
    }
    done: set[str] = set()
    recving, errors = _step(consumer, NixlConnectorMetadata(reqs_to_recv=recvs))
    deadline = time.monotonic() + 30
    while True:
        done |= recving
        assert not errors, f"load errors in the wave of producer {first}: {errors}"
        if done == set(recvs):
            break
        assert time.monotonic() < deadline, f"READs not done: {set(recvs) - done}"
        for p in wave.values():  # producers answer lease questions in their steps
            _step(p.worker, idle)
        recving, errors = _step(consumer, idle)
    for j in range(len(wave)):  # each READ landed its own producer's bytes
        assert all(bool((t[j + 1] == first + j + 1).all()) for t in cache.values())
    for p in wave.values():
        p.worker.shutdown()
        assert p.worker.leaked == LiveCounts(0, 0, 0, 0)
    return len(done)


@pytest.fixture(scope="module")
def churn() -> Iterator[Churn]:
    fabric = FakeFabric(cycles_before_xfer_done=1)  # 0 would complete READs without bytes
    consumer = NixlWorker(_config("kv_consumer", "decode", fabric), SPEC)
    cache = _cache(0.0)
    consumer.register_kv_caches(cache)
    reader = consumer.registered.reader
    fake = consumer.registered.transport
    assert reader is not None and isinstance(fake, FabricNixlWrapper)
    rss: list[float] = []
    fds: list[int] = []
    reads = 0
    start = time.monotonic()
    idle = NixlConnectorMetadata()
    try:
        for first in range(0, PRODUCERS, WAVE):
            if first == WARM_UP:
                _wait(lambda: len(reader.engines) == 0, 10, lambda: _step(consumer, idle))
                gc.collect()
                rss.append(_rss_mib())
                fds.append(_fds())
            reads += _serve_wave(consumer, cache, fabric, first)
            fake.calls.clear()  # the test double's log of every call: not the consumer's memory
        # No step from here on: the watch thread must release the last wave by itself.
        _wait(lambda: len(reader.engines) == 0, 10, lambda: None)
        gc.collect()
        rss.append(_rss_mib())
        fds.append(_fds())
        yield Churn(consumer, rss, fds, time.monotonic() - start, reads)
    finally:
        consumer.shutdown()
    assert consumer.leaked == LiveCounts(0, 0, 0, 0)


def test_every_exited_producers_agent_dlist_and_watch_is_released(churn: Churn) -> None:
    """Checked against broken builds: ``RemoteEngines`` without its ``PeerWatch`` (no agent is
    ever released, 500 stay cached), and the old ``LeaseConfirmer`` that kept a socket per
    producer for ever (found by this test: 480 descriptors more after the warm-up, each
    reconnecting to its exited producer); this fails on both."""
    logger.warning("%d producers, %d READs in %.1f s", PRODUCERS, churn.reads, churn.seconds)
    assert churn.reads == PRODUCERS
    transport = churn.consumer.registered.transport
    assert transport.num_remote_agents == 0
    assert transport.num_live_dlist_handles == 2  # the consumer's cache and board windows
    assert transport.num_live_xfer_handles == 0
    reader = churn.consumer.registered.reader
    assert reader is not None and len(reader.engines) == 0
    assert reader.confirmer.num_sockets == 0  # lease questions' sockets closed too
    assert churn.fds[1] <= churn.fds[0] + 2, churn.fds  # every socket's descriptor closed


def test_the_consumers_memory_stays_bounded(churn: Churn) -> None:
    """RSS after the last producer left, against after the first 20: at most 20 MiB more.
    Checked against a broken build (``RemoteEngines.attach`` keeping 64 KiB per producer,
    about a small model's agent metadata): this fails."""
    growth = churn.rss_mib[1] - churn.rss_mib[0]
    logger.warning("RSS %.1f -> %.1f MiB (%+.1f)", *churn.rss_mib, growth)
    assert growth <= RSS_BUDGET_MIB
