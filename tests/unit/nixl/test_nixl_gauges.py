"""NixlWorker's gauges follow what it holds: leases, READs in flight, a gone producer's dlist.

Workers on FakeNixlWrapper with a clock that stands still; real zmq side channels.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from nixl_helpers import FakeClock, Node, make_node, serving, wait_for
from worker_steps import hold, recv

from kvbridge.nixl.metadata import NixlConnectorMetadata

IDLE = {
    "num_live_leases": 0,
    "nixl_num_inflight_xfer_handles": 0,
    "nixl_num_inflight_dlist_handles": 0,
    "nixl_num_inflight_loads": 0,
}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def consumer(clock: FakeClock) -> Iterator[Node]:
    yield from serving(make_node("kv_consumer", "decode", clock, cycles=10_000))


def gauges(node: Node) -> dict[str, int]:
    values = node.worker.get_kv_connector_gauges()
    assert isinstance(values, dict)
    return values


def test_gauges_follow_a_lease_a_read_and_a_gone_producers_dlist(
    clock: FakeClock, consumer: Node
) -> None:
    producer = make_node("kv_producer", "prefill", clock)
    assert gauges(consumer) == {**IDLE, "nixl_num_remote_agents": 0}
    hold(producer, "p-1")
    assert gauges(producer) == {**IDLE, "num_live_leases": 1, "nixl_num_remote_agents": 0}
    consumer.step(recv(producer.worker.side_channel_port))  # handshake, then the READ stays
    wait_for(lambda: gauges(consumer)["nixl_num_inflight_xfer_handles"] == 1, poll=consumer.step)
    in_flight = {**IDLE, "nixl_num_inflight_xfer_handles": 1, "nixl_num_inflight_loads": 1}
    assert gauges(consumer) == {**in_flight, "nixl_num_remote_agents": 1}  # its dlist stands
    # The producer exits mid-READ and the READ's handle will not release for a few tries (more
    # than one step polls): the gone producer's dlist stays bound to it, counted in flight.
    for _ in range(4):
        consumer.fake.fail_next_call("release_xfer_handle")
    producer.worker.shutdown()
    assert gauges(producer) == {}  # a worker that shut down holds nothing
    seen: list[dict[str, int]] = []  # the gauges after each step
    recving: set[str] = set()

    def step() -> None:
        recving.update(consumer.step()[1])
        seen.append(gauges(consumer))

    wait_for(lambda: "d-1" in recving and consumer.fake.num_remote_agents == 0, poll=step)
    # the gone producer's dlists (its blocks' and its lease board's) kept with the handle, and
    # the load with them: it ends (and is reported) only once its READ is cancelled
    stale = {**IDLE, "nixl_num_inflight_xfer_handles": 1, "nixl_num_inflight_dlist_handles": 2}
    assert {**stale, "nixl_num_inflight_loads": 1, "nixl_num_remote_agents": 1} in seen, seen
    assert seen[-1] == {**IDLE, "nixl_num_remote_agents": 0}  # released on a retry


def test_a_producer_whose_read_failed_is_released_in_the_step_that_saw_it(
    clock: FakeClock,
) -> None:
    """The READ ends in ERR: the load fails and the producer (stale, nothing bound to it) is
    detached in that same step, so an engine that stops stepping holds no dlist of it. Fails
    when stale producers are only swept at the start of the next step."""
    consumer = next(serving(make_node("kv_consumer", "decode", clock)))
    producer = make_node("kv_producer", "prefill", clock)
    hold(producer, "p-1")
    consumer.fake.fail_next_xfers(1)
    recving: set[str] = set()
    errors: set[int] = set()

    def step(meta: NixlConnectorMetadata | None = None) -> None:
        _, done, bad = consumer.step(meta)
        recving.update(done)
        errors.update(bad)

    step(recv(producer.worker.side_channel_port))
    wait_for(lambda: "d-1" in recving, poll=step)
    assert errors  # the load failed
    assert gauges(consumer) == {**IDLE, "nixl_num_remote_agents": 0}
    assert consumer.fake.num_remote_agents == 0
    producer.worker.shutdown()
    consumer.worker.shutdown()
