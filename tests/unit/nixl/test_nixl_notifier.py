"""A consumer notifies producers through a second agent of its own (``notify_agent``), never
on the endpoints its READs use; without one (off, or it cannot be made or load the producer)
it notifies through its READ agent as before. Either way every notification arrives, and
both agents release everything at shutdown.

Workers on FakeNixlWrapper (notifications recorded) or on one ``FakeFabric`` (notifications
delivered); the side channels are real zmq sockets on 127.0.0.1.
"""

from __future__ import annotations

from typing import Any

import pytest
from nixl_helpers import (
    FakeClock,
    Node,
    config,
    kv_caches,
    make_node,
    notifier_of,
    spec,
    wait_for,
)
from worker_steps import as_tuple, got_recving, hold, recv, run_until, send, step

from kvbridge.config import ConfigError
from kvbridge.nixl.fake import FakeNixlWrapper
from kvbridge.nixl.fake_fabric import FakeFabric
from kvbridge.nixl.settings import NixlSettings
from kvbridge.nixl.transport import LiveCounts, NixlTransport
from kvbridge.nixl.transport_factory import NOTIFY_SUFFIX
from kvbridge.nixl.worker import NixlWorker

ZERO = LiveCounts(0, 0, 0, 0)


def test_done_heartbeat_and_release_go_through_the_notification_agent() -> None:
    """On one fabric: the producer hears the consumer's notifications from its notification
    agent, which holds the producer while attached and nothing once it is gone."""
    fabric = FakeFabric(cycles_before_xfer_done=1)
    clock = FakeClock()

    caches = []  # referenced until the end: the fabric copies between them

    def worker(role: str, engine: str) -> NixlWorker:
        w = NixlWorker(config(role, engine, nixl_wrapper=fabric.wrapper), spec(), clock=clock)
        caches.append(kv_caches(spec(), fill=1.0 if role == "kv_producer" else None))
        w.register_kv_caches(caches[-1])
        return w

    p, d = worker("kv_producer", "prefill"), worker("kv_consumer", "decode")
    try:
        main, notifier = fabric.agents[d.agent_name], fabric.agents[d.agent_name + NOTIFY_SUFFIX]
        assert notifier_of(d) is notifier and notifier.num_registered_regions == 0
        for n in range(2):  # the second load on the attached producer
            load(p, d, n)
        assert not main.sent_notifs and main.calls_to("send_notif") == []
        kinds = [as_tuple(m)[0] for _, m in notifier.sent_notifs]
        assert kinds.count("done") == 2 and notifier.num_remote_agents == 1
        p.shutdown()  # gone: detached from both agents
        wait_for(lambda: notifier.num_remote_agents == 0 and main.num_remote_agents == 0)
    finally:
        p.shutdown()
        d.shutdown()
    assert p.leaked == ZERO and d.leaked == ZERO


def load(p: NixlWorker, d: NixlWorker, n: int) -> None:
    """P holds p-<n>; D loads it as d-<n>; P frees it on D's "done"."""
    rid, did = f"p-{n}", f"d-{n}"
    p.bind_connector_metadata(send(rid))
    p.start_load_kv()
    assert p.get_finished(frozenset({rid})).sending == frozenset()
    p.clear_connector_metadata()
    got = [step(d, recv(p.side_channel_port, rid=did, remote_rid=rid))]
    wait_for(lambda: did in got[-1][1], poll=lambda: got.append(step(d)))
    wait_for(lambda: rid in step(p, finished=frozenset({rid}))[0])  # "done" freed it


def load_once(**extra: Any) -> tuple[Node, Node, list[FakeNixlWrapper]]:
    """A producer and a consumer (``extra``: its config) on FakeNixlWrappers, one load done;
    (producer, consumer, the consumer's transports in the order made)."""
    clock = FakeClock()
    producer = make_node("kv_producer", "prefill", clock)
    made: list[FakeNixlWrapper] = []
    factory = extra.pop("factory", None)

    def record(name: str) -> NixlTransport:
        made.append(factory(name) if factory else FakeNixlWrapper(name))
        return made[-1]

    consumer = NixlWorker(
        config("kv_consumer", "decode", nixl_wrapper=record, **extra), spec(), clock=clock
    )
    consumer.register_kv_caches(kv_caches(spec()))
    hold(producer)
    node = Node(consumer, made[0])
    run_until(node, got_recving("d-1"), meta=recv(producer.worker.side_channel_port))
    return producer, node, made


def sent(transport: FakeNixlWrapper) -> list[tuple[str, list[str]]]:
    return [as_tuple(m) for _, m in transport.sent_notifs]


@pytest.mark.parametrize("how", ["off", "no agent", "cannot load the producer"])
def test_without_a_usable_notification_agent_the_read_agent_notifies(how: str) -> None:
    extra: dict[str, Any] = {}
    if how == "off":
        extra["notify_agent"] = False
    elif how == "no agent":

        def factory(name: str) -> FakeNixlWrapper:
            if name.endswith(NOTIFY_SUFFIX):
                raise RuntimeError("no second agent here")
            return FakeNixlWrapper(name)

        extra["factory"] = factory
    else:

        def factory(name: str) -> FakeNixlWrapper:
            fake = FakeNixlWrapper(name)
            if name.endswith(NOTIFY_SUFFIX):
                fake.fail_next_call("add_remote_agent")
            return fake

        extra["factory"] = factory
    producer, consumer, made = load_once(**extra)
    try:
        assert ("done", ["p-1"]) in sent(made[0])
        reader = consumer.worker.registered.reader
        assert reader is not None
        remote = reader.engines.get("prefill")
        assert remote is not None and remote.notifier is None
        if how == "cannot load the producer":
            assert len(made) == 2 and sent(made[1]) == [] and made[1].num_remote_agents == 0
        else:
            assert len(made) == 1 and reader.engines.notifier is None
    finally:
        consumer.worker.shutdown()
        producer.worker.shutdown()
    assert consumer.worker.leaked == ZERO and producer.worker.leaked == ZERO


class OtherName(FakeNixlWrapper):
    """A notification agent that loads the producer under another name (cannot be with
    NIXL: the same metadata names the same agent) and then fails to unload it."""

    REMOTE_AGENT_NAME = "someone-else"

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.fail_next_call("remove_remote_agent")


def test_a_notification_agent_that_cannot_unload_a_misnamed_producer_never_fails_the_load() -> None:
    def factory(name: str) -> FakeNixlWrapper:
        return OtherName(name) if name.endswith(NOTIFY_SUFFIX) else FakeNixlWrapper(name)

    producer, consumer, made = load_once(factory=factory)  # the load (and its attach) ended
    try:
        assert ("done", ["p-1"]) in sent(made[0]) and sent(made[1]) == []
        reader = consumer.worker.registered.reader
        assert reader is not None
        remote = reader.engines.get("prefill")
        assert remote is not None and remote.notifier is None  # the READ agent notifies it
    finally:
        consumer.worker.shutdown()
        producer.worker.shutdown()
    leaked = consumer.worker.leaked
    assert leaked is not None and leaked.remote_agents == 1  # the one it could not unload


def test_what_the_notification_agent_still_holds_at_shutdown_counts_as_leaked() -> None:
    """Its producer could not be removed from it: the worker reports that agent as leaked."""
    producer, consumer, made = load_once()
    notifier = made[1]
    assert ("done", ["p-1"]) in sent(notifier) and sent(made[0]) == []
    notifier.fail_next_call("remove_remote_agent")
    consumer.worker.shutdown()
    producer.worker.shutdown()
    assert consumer.worker.leaked == LiveCounts(0, 0, 0, 1)  # the notifier's producer
    assert made[0].live_counts() == ZERO


@pytest.mark.parametrize("value", ["yes", 1])
def test_notify_agent_must_be_a_bool(value: Any) -> None:
    with pytest.raises(ConfigError, match="notify_agent"):
        NixlSettings.from_config(config("kv_consumer", "d", notify_agent=value))
    assert NixlSettings.from_config(config("kv_consumer", "d", notify_agent=False))
