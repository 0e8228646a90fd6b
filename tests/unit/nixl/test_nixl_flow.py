"""Prefill -> decode through the factory: both halves of both engines, one process.

With ``nixl_wrapper="nixl"`` the two workers are real NIXL agents (UCX, DRAM): the blocks'
bytes really move and the consumer's ``done`` notification really reaches the producer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from nixl_helpers import BLOCK_SIZE, config, request, spec, wait_for

from kvbridge.connector.base import ConnectorOutput, KVConnectorRole
from kvbridge.connector.factory import create_connector
from kvbridge.connector.stats import KVConnectorStats
from kvbridge.connector.types import SchedulerStep, SimpleRequest
from kvbridge.kit.worker_step import run_worker_step
from kvbridge.nixl import stats as keys
from kvbridge.nixl.fake import FakeNixlWrapper
from kvbridge.nixl.scheduler import NixlScheduler
from kvbridge.nixl.transport import LiveCounts, NixlTransport
from kvbridge.nixl.worker import NixlWorker
from support.nixl_marks import needs_nixl


@dataclass
class Engine:
    """One engine's connector halves, stepped the way an engine steps them."""

    sched: NixlScheduler
    worker: NixlWorker
    cache: dict[str, torch.Tensor]
    transports: list[NixlTransport]
    step_id: int = 0
    stats: KVConnectorStats | None = None

    def step(self, finished: frozenset[str] = frozenset()) -> ConnectorOutput:
        meta = self.sched.build_connector_meta(
            SchedulerStep(step_id=self.step_id, finished_req_ids=finished)
        )
        self.step_id += 1
        w = self.worker
        out = run_worker_step(w, meta, finished)
        self.sched.update_connector_output(out)
        if isinstance(out.stats, KVConnectorStats):
            self.stats = out.stats if self.stats is None else self.stats.aggregate(out.stats)
        self.sched.check_integrity()
        w.check_integrity()
        return out

    def run_until(
        self, predicate: Any, finished: frozenset[str] = frozenset()
    ) -> list[ConnectorOutput]:
        outs: list[ConnectorOutput] = []
        wait_for(
            lambda: any(predicate(o) for o in outs), poll=lambda: outs.append(self.step(finished))
        )
        return outs


def build(role: str, engine_id: str, wrapper: str, seed: int) -> Engine:
    transports: list[NixlTransport] = []

    def factory(name: str) -> NixlTransport:
        if wrapper == "fake":
            transports.append(FakeNixlWrapper(name, cycles_before_xfer_done=2))
        else:
            from kvbridge.nixl.wrapper import NixlWrapper

            transports.append(NixlWrapper(name))
        return transports[-1]

    cfg = config(role, engine_id, nixl_wrapper=factory)
    s = spec(num_blocks=12)
    sched = create_connector(cfg, KVConnectorRole.SCHEDULER, s)
    worker = create_connector(cfg, KVConnectorRole.WORKER, s)
    assert isinstance(sched, NixlScheduler) and isinstance(worker, NixlWorker)
    gen = torch.Generator().manual_seed(seed)
    shape = (s.num_blocks, 2, s.block_size, s.num_kv_heads, s.head_dim)
    cache = {f"layers.{i}": torch.rand(shape, generator=gen) for i in range(s.num_layers)}
    worker.register_kv_caches(cache)
    return Engine(sched, worker, cache, transports)


WRAPPERS = [
    "fake",
    pytest.param(
        "nixl",
        marks=[
            pytest.mark.integration,
            needs_nixl,
        ],
    ),
]


@pytest.fixture(params=WRAPPERS)
def pd(request: pytest.FixtureRequest) -> Iterator[tuple[Engine, Engine, str]]:
    producer = build("kv_producer", "prefill", request.param, seed=1)
    consumer = build("kv_consumer", "decode", request.param, seed=2)
    yield producer, consumer, request.param
    for engine in (consumer, producer):
        engine.worker.shutdown()
        assert engine.worker.leaked == LiveCounts(0, 0, 0, 0)


def bridge_notifs(producer: Engine, consumer: Engine, wrapper: str) -> None:
    """With the fake, carry the consumer's notifications to the producer by hand."""
    if wrapper != "fake":
        return
    src, dst = consumer.transports[-1], producer.transports[0]  # its notification agent
    assert isinstance(src, FakeNixlWrapper) and isinstance(dst, FakeNixlWrapper)
    for _, msg in src.sent_notifs:
        dst.deliver_notif(consumer.worker.agent_name, msg)
    src.sent_notifs.clear()


def test_prefill_then_decode_moves_the_blocks_and_frees_them_on_both_sides(
    pd: tuple[Engine, Engine, str],
) -> None:
    producer, consumer, wrapper = pd
    producer.step()  # the worker announces its side-channel port
    prompt = 10  # 3 blocks of 4, the last one partial
    p_blocks = [5, 9, 3]  # scattered on the producer
    p_req = request("p-1", prompt, {"do_remote_decode": True}, computed=prompt)
    delay, params = producer.sched.request_finished(p_req, p_blocks)
    assert delay and params is not None
    assert params["remote_port"] == producer.worker.side_channel_port
    producer.step(finished=frozenset({"p-1"}))  # lease starts
    assert producer.worker.leases.num_live == 1

    d_req = request("d-1", prompt, params)
    assert consumer.sched.get_num_new_matched_tokens(d_req, 0) == (prompt - 1, True)
    d_blocks = [1, 2, 7]  # first two contiguous locally, not remotely
    consumer.sched.update_state_after_alloc(d_req, (d_blocks,), prompt - 1)
    outs = consumer.run_until(lambda o: "d-1" in o.finished_recving)
    assert all(not o.invalid_block_ids for o in outs)
    if wrapper == "nixl":
        for name, tensor in consumer.cache.items():
            assert torch.equal(tensor[d_blocks], producer.cache[name][p_blocks]), name
            assert not torch.equal(tensor[[0]], producer.cache[name][[0]])  # others untouched
    assert consumer.sched.num_waiting_for_remote_kv == 0

    bridge_notifs(producer, consumer, wrapper)
    producer.run_until(lambda o: "p-1" in o.finished_sending, finished=frozenset({"p-1"}))
    assert producer.sched.num_held_for_remote_decode == 0
    assert producer.worker.leases.num_live == 0
    assert consumer.sched.request_finished(d_req, d_blocks) == (False, None)
    assert not consumer.sched.has_request_state("d-1")
    assert not producer.sched.has_request_state("p-1")
    stats = consumer.stats
    assert stats is not None
    assert stats.data[keys.NUM_TRANSFERS] == 1
    assert stats.data[keys.BYTES] == [3 * 2 * spec().block_bytes_per_layer]
    assert stats.data[keys.NUM_DESCRIPTORS] == [6]  # no run is contiguous on both sides
    assert producer.stats is not None and producer.stats.data[keys.NOTIFICATIONS_RECEIVED] >= 1


def test_contiguous_runs_move_as_merged_descriptors(pd: tuple[Engine, Engine, str]) -> None:
    producer, consumer, wrapper = pd
    producer.step()
    prompt = 4 * BLOCK_SIZE
    p_blocks = [2, 3, 4, 8]
    _, params = producer.sched.request_finished(
        request("p-2", prompt, {"do_remote_decode": True}, computed=prompt), p_blocks
    )
    producer.step(finished=frozenset({"p-2"}))
    d_req: SimpleRequest = request("d-2", prompt, params)
    consumer.sched.get_num_new_matched_tokens(d_req, 0)
    d_blocks = [6, 7, 8, 0]
    consumer.sched.update_state_after_alloc(d_req, (d_blocks,), prompt - 1)
    consumer.run_until(lambda o: "d-2" in o.finished_recving)
    if wrapper == "nixl":
        for name, tensor in consumer.cache.items():
            assert torch.equal(tensor[d_blocks], producer.cache[name][p_blocks]), name
    assert consumer.stats is not None
    assert consumer.stats.data[keys.NUM_DESCRIPTORS] == [4]  # 2 runs x 2 layers
    bridge_notifs(producer, consumer, wrapper)
    producer.run_until(lambda o: "p-2" in o.finished_sending, finished=frozenset({"p-2"}))
