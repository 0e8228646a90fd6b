"""A producer on ``side_channel_port: 0`` (a free port, picked by the worker) never skips a hold
silently: the scheduler half learns the port from the workers' handshake metadata at start-up
(``set_xfer_handshake_metadata``), so the very first request holds; without it, finishing a
remote-decode request is an error that says what the engine must call."""

from __future__ import annotations

import pytest
from nixl_helpers import config, make_node, request, spec

from kvbridge.connector.base import ConnectorOutput, KVConnectorRole
from kvbridge.connector.factory import create_connector
from kvbridge.connector.types import SimpleRequest
from kvbridge.nixl.metadata import NixlWorkerMetadata
from kvbridge.nixl.scheduler import NixlScheduler


def producer() -> NixlScheduler:
    sched = create_connector(config("kv_producer", "p"), KVConnectorRole.SCHEDULER, spec())
    assert isinstance(sched, NixlScheduler)
    return sched


def remote_decode(rid: str) -> SimpleRequest:
    return request(rid, 4, {"do_remote_decode": True}, computed=4)


def test_the_first_request_holds_once_the_engine_passed_the_workers_handshake() -> None:
    node = make_node("kv_producer", "p")  # side_channel_port 0: the worker binds a free port
    try:
        handshake = node.worker.get_handshake_metadata()
        assert handshake is not None and handshake.side_channel_port > 0
        sched = producer()
        sched.set_xfer_handshake_metadata({0: handshake})  # start-up, before any worker step
        delay, params = sched.request_finished(remote_decode("p-1"), [1])
        assert delay and params is not None
        assert (params["remote_host"], params["remote_port"]) == (
            handshake.side_channel_host,
            handshake.side_channel_port,
        )
    finally:
        node.worker.shutdown()


def test_without_the_handshake_the_first_finish_fails_loudly_and_keeps_no_state() -> None:
    sched = producer()
    with pytest.raises(RuntimeError, match="side_channel_port is 0.*set_xfer_handshake_metadata"):
        sched.request_finished(remote_decode("p-1"), [1])
    assert not sched.has_request_state("p-1")
    assert sched.request_finished(request("plain", 4, computed=4), [1]) == (False, None)


def test_a_port_announced_by_a_worker_step_is_used_from_then_on() -> None:
    sched = producer()
    announced = NixlWorkerMetadata(side_channel_host="127.0.0.1", side_channel_port=41234)
    sched.update_connector_output(ConnectorOutput(worker_meta=announced))
    delay, params = sched.request_finished(remote_decode("p-2"), [1])
    assert delay and params is not None and params["remote_port"] == 41234
