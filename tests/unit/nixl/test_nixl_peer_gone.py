"""A consumer notices that a producer exited (its side channel closed) and acts at once.

Workers on FakeNixlWrapper with an injected clock that never advances here, so nothing below
can be a timeout; the side channels are real zmq sockets on 127.0.0.1.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Hashable, Iterator

import pytest
from nixl_helpers import FakeClock, Node, make_node, serving, wait_for
from worker_steps import got_recving, hold, recv, run_until

from kvbridge.nixl.handshake import HandshakeListener
from kvbridge.nixl.metadata import NixlWorkerMetadata
from kvbridge.nixl.peer_watch import PeerWatch
from kvbridge.nixl.reader import KVReader


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def consumer(clock: FakeClock) -> Iterator[Node]:
    yield from serving(make_node("kv_consumer", "decode", clock, cycles=10_000))


def reader(node: Node) -> KVReader:
    r = node.worker.registered.reader
    assert r is not None
    return r


def attach(consumer: Node, producer: Node) -> None:
    """One good load from ``producer``: the consumer attaches it, then idles."""
    hold(producer, "p-0")
    consumer.fake.cycles_before_xfer_done = 0
    meta = recv(producer.worker.side_channel_port, rid="d-0", remote_rid="p-0")
    assert run_until(consumer, got_recving("d-0"), meta=meta)[-1][2] == set()
    # the cache's, the board READ windows', and the producer's blocks' and lease board's
    assert consumer.fake.num_remote_agents == 1 and consumer.fake.num_live_dlist_handles == 4


def test_an_idle_consumer_releases_a_gone_producers_agent_and_dlist(
    clock: FakeClock, consumer: Node
) -> None:
    """vLLM #58063: nothing but a new handshake released a dead producer's registrations.
    Checked against a broken build (no ``PeerWatch``): the release never comes, this fails."""
    producer = make_node("kv_producer", "prefill", clock)
    attach(consumer, producer)
    producer.worker.shutdown()
    # No consumer step from here on: the watch's thread does the work.
    wait_for(lambda: consumer.fake.num_remote_agents == 0)
    assert consumer.fake.num_live_dlist_handles == 2  # the cache's and the board windows'
    assert reader(consumer).engines.get("prefill") is None
    removed = consumer.fake.calls_to("remove_remote_agent")
    assert [args for args, _ in removed] == [("fake-remote",)]


@pytest.mark.parametrize("release_fails", [False, True])
def test_a_read_from_a_gone_producer_fails_at_once_and_its_agent_outlives_the_transfer(
    clock: FakeClock, consumer: Node, release_fails: bool
) -> None:
    """The READ in flight fails at once (no timeout: the clock stands still); the agent is
    removed only after the READ's handle is released, even when that takes a retry. Checked
    against broken builds (``on_lost`` detaching busy engines too; an unreleased handle not
    keeping its engine bound): this test fails."""
    producer = make_node("kv_producer", "prefill", clock)
    attach(consumer, producer)
    hold(producer, "p-1")
    consumer.fake.cycles_before_xfer_done = 10_000
    before = len(consumer.fake.calls)
    consumer.step(recv(producer.worker.side_channel_port))
    assert consumer.fake.num_live_xfer_handles == 1  # the READ is in flight
    if release_fails:
        consumer.fake.fail_next_call("release_xfer_handle")
    producer.worker.shutdown()
    _, recving, errors = run_until(consumer, got_recving("d-1"))[-1]
    assert recving == {"d-1"} and errors == {2, 3, 4}
    meta = consumer.worker.build_connector_worker_meta()
    assert isinstance(meta, NixlWorkerMetadata) and "is gone" in meta.load_failures["d-1"]
    wait_for(lambda: consumer.fake.num_remote_agents == 0, poll=consumer.step)
    names = [name for name, _, _ in consumer.fake.calls[before:]]
    released = len(names) - 1 - names[::-1].index("release_xfer_handle")  # the last release
    assert released < names.index("remove_remote_agent")
    assert names.count("release_xfer_handle") == 1 + release_fails
    assert consumer.fake.num_live_xfer_handles == 0
    sent = [m for agent, m in consumer.sent_notifs if agent == "fake-remote"]
    assert len(sent) == 2  # the first load's heartbeat and "done": nothing to a gone producer
    reader(consumer).check_integrity()


def test_a_new_instance_attached_meanwhile_is_not_detached_for_the_old_ones_loss(
    clock: FakeClock, consumer: Node
) -> None:
    producer = make_node("kv_producer", "prefill", clock)
    attach(consumer, producer)
    engines = reader(consumer).engines
    old = engines.get("prefill")
    assert old is not None
    engines.on_lost(("prefill", "an-older-instance"), "closed")
    assert engines.get("prefill") is old and not old.stale and engines.take_gone() == {}
    producer.worker.shutdown()


def test_watch_reports_a_closed_and_a_refused_side_channel_once_each() -> None:
    lost: list[tuple[Hashable, str]] = []
    done = threading.Event()

    def on_lost(key: Hashable, why: str) -> None:
        lost.append((key, why))
        if len(lost) == 2:
            done.set()

    listener = HandshakeListener("127.0.0.1", 0, b"", "hash")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    watch = PeerWatch(on_lost)
    try:
        watch.watch("up", "127.0.0.1", listener.port)
        watch.watch("dead", "127.0.0.1", dead)
        wait_for(lambda: len(lost) == 1)
        assert lost[0][0] == "dead" and "refused" in lost[0][1]
        listener.close()
        assert done.wait(5)
        assert lost[1][0] == "up" and "closed the connection" in lost[1][1]
    finally:
        watch.close()
        listener.close()
    assert not [t for t in threading.enumerate() if t.name == "kvbridge-nixl-watch"]
