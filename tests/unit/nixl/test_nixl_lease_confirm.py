"""A consumer never reports a READ as good unless the producer's lease held until it ended.

Workers on FakeNixlWrapper with an injected clock; the lease questions go over the producer's
real side channel on 127.0.0.1.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from nixl_helpers import FakeClock, Node, make_node, serving, wait_for

from kvbridge.nixl import stats as keys
from kvbridge.nixl.leases import MAX_PROMISE_S
from kvbridge.nixl.metadata import (
    NixlConnectorMetadata,
    NixlWorkerMetadata,
    RecvSpec,
    SendSpec,
    decode_notif,
)
from kvbridge.nixl.reader import KVReader

Step = tuple[frozenset[str], frozenset[str], set[int]]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def producer(clock: FakeClock) -> Iterator[Node]:
    yield from serving(make_node("kv_producer", "prefill", clock))


@pytest.fixture
def consumer(clock: FakeClock) -> Iterator[Node]:
    yield from serving(make_consumer(clock))


def make_consumer(clock: Callable[[], float]) -> Node:
    """A consumer whose READs stay in flight until a test sets ``cycles_before_xfer_done``."""
    return make_node("kv_consumer", "decode", clock, cycles=10_000, transfer_timeout_s=100.0)


def hold(producer: Node, rid: str = "p-1") -> None:
    spec = SendSpec(
        request_id=rid,
        num_blocks=3,
        lease_duration_s=30.0,
        abort_timeout_s=60.0,
        block_ids=([5, 6, 7],),
    )
    producer.step(NixlConnectorMetadata(reqs_to_send={rid: spec}), finished=frozenset({rid}))


def load(port: int | None, rid: str = "d-1", remote_rid: str = "p-1") -> NixlConnectorMetadata:
    spec = RecvSpec(
        request_id=rid,
        local_block_ids=([2, 3, 4],),
        remote_engine_id="prefill",
        remote_host="127.0.0.1",
        remote_port=port or 1,
        remote_block_ids=([5, 6, 7],),
        remote_request_id=remote_rid,
    )
    return NixlConnectorMetadata(reqs_to_recv={rid: spec})


def reader(node: Node) -> KVReader:
    r = node.worker.registered.reader
    assert r is not None
    return r


def step_until(node: Node, rid: str, clock: FakeClock | None = None, tick: float = 0.0) -> Step:
    """Step (advancing ``clock`` by ``tick`` each time) until ``rid`` is finished receiving."""
    last: list[Step] = []

    def poll() -> None:
        if clock is not None:
            clock.advance(tick)
        last.append(node.step())

    wait_for(lambda: bool(last) and rid in last[-1][1], poll=poll)
    return last[-1]


def read_posted(consumer: Node, producer: Node, *meta: NixlConnectorMetadata) -> None:
    for m in meta or (load(producer.worker.side_channel_port),):
        consumer.step(m)
    n = len(meta or (1,))
    wait_for(lambda: consumer.fake.num_live_xfer_handles == n, poll=consumer.step)


def failure(node: Node, rid: str) -> str:
    meta = node.worker.build_connector_worker_meta()
    assert isinstance(meta, NixlWorkerMetadata)
    return meta.load_failures[rid]


def test_normal_path_confirms_a_batch_with_one_query_asked_with_the_reads(
    producer: Node, consumer: Node
) -> None:
    ids = [f"p-{i}" for i in range(3)]
    for rid in ids:
        hold(producer, rid)
    port = producer.worker.side_channel_port
    consumer.step(NixlConnectorMetadata(reqs_to_recv={
        f"d-{i}": load(port, f"d-{i}", f"p-{i}").reqs_to_recv[f"d-{i}"] for i in range(3)
    }))  # fmt: skip
    wait_for(lambda: consumer.fake.num_live_xfer_handles == 3, poll=consumer.step)
    confirmer = reader(consumer).confirmer
    wait_for(lambda: confirmer.num_open == 0, poll=consumer.step)  # answered while reading
    assert reader(consumer).num_inflight == 3
    consumer.fake.cycles_before_xfer_done = 0
    recving: set[str] = set()
    wait_for(lambda: recving >= {"d-0", "d-1", "d-2"}, poll=lambda: recving.update(_ok(consumer)))
    assert confirmer.num_queries == 1  # no question after the READs: the answer covered them
    stats = consumer.worker.get_kv_connector_stats()
    assert stats is not None and stats.data[keys.CONFIRMS_WITH_READ] == 3
    assert keys.CONFIRM_TIME not in stats.data and keys.FAILED_CONFIRMS not in stats.data
    consumer.worker.check_integrity()


def test_a_read_that_outlasts_the_promise_is_confirmed_after_it_ends(
    producer: Node, consumer: Node, clock: FakeClock
) -> None:
    hold(producer)
    read_posted(consumer, producer)
    confirmer = reader(consumer).confirmer
    wait_for(lambda: confirmer.num_open == 0, poll=consumer.step)
    clock.advance(MAX_PROMISE_S)  # the READ ends later than the answer promised
    consumer.fake.cycles_before_xfer_done = 0
    _, _, errors = step_until(consumer, "d-1")
    assert errors == set() and confirmer.num_queries == 2
    stats = consumer.worker.get_kv_connector_stats()
    assert stats is not None and len(stats.data[keys.CONFIRM_TIME]) == 1
    assert keys.CONFIRMS_WITH_READ not in stats.data


@pytest.mark.parametrize("end", ["live", "done"])
def test_shutdown_keeps_the_memory_a_consumer_was_promised(
    producer: Node, consumer: Node, end: str
) -> None:
    hold(producer)
    read_posted(consumer, producer)
    wait_for(lambda: reader(consumer).confirmer.num_open == 0, poll=consumer.step)
    if end == "done":  # the consumer said it is finished: nothing left to keep
        producer.worker.leases.complete("p-1", now=0.0)
    start = time.monotonic()
    producer.worker.shutdown()
    waited = time.monotonic() - start
    if end == "live":
        assert waited >= 0.9 * MAX_PROMISE_S
    else:
        assert waited < 0.5 * MAX_PROMISE_S


def _ok(node: Node) -> frozenset[str]:
    _, recving, errors = node.step()
    assert errors == set()
    return recving


@pytest.mark.parametrize("lapsed", ["while the READ ran", "before the READ was posted"])
def test_lease_lapsed_before_the_read_ended_is_a_load_error(
    producer: Node, consumer: Node, clock: FakeClock, lapsed: str
) -> None:
    """A READ of blocks whose lease lapsed never lands as good (the producer freed them).
    Checked against a broken build (``LeaseProof.judge`` landing on "expired"): both cases
    fail."""
    hold(producer)
    if lapsed == "while the READ ran":
        read_posted(consumer, producer)
    clock.advance(31)  # no heartbeat reaches the producer: its lease lapses, blocks are freed
    assert producer.step(finished=frozenset())[0] == {"p-1"}
    if lapsed != "while the READ ran":
        read_posted(consumer, producer)
    consumer.fake.cycles_before_xfer_done = 0  # the READ completes, with whatever it read
    _, recving, errors = step_until(consumer, "d-1")
    assert recving == {"d-1"} and errors == {2, 3, 4}
    assert "was expired when the READ ended" in failure(consumer, "d-1")
    stats = consumer.worker.get_kv_connector_stats()
    assert stats is not None and stats.data[keys.FAILED_CONFIRMS] == 1
    kinds = [decode_notif(m).kind for _, m in consumer.sent_notifs]
    assert "release" not in kinds  # the READ's own "done" already went out


def test_producer_worker_slow_to_step_still_answers_held(
    producer: Node, consumer: Node, clock: FakeClock
) -> None:
    hold(producer)
    read_posted(consumer, producer)
    clock.advance(31)  # lapsed by the clock, but the producer has not stepped: blocks still held
    consumer.fake.cycles_before_xfer_done = 0
    _, _, errors = step_until(consumer, "d-1")
    assert errors == set()
    assert producer.worker.leases.outcome("p-1") == "held"


def test_restarted_producer_fails_the_load_at_once(clock: FakeClock, consumer: Node) -> None:
    first = make_node("kv_producer", "prefill", clock)
    hold(first)
    port = first.worker.side_channel_port
    read_posted(consumer, first)
    wait_for(lambda: reader(consumer).confirmer.num_open == 0, poll=consumer.step)  # "held"
    first.worker.shutdown()
    clock.advance(1.0)  # past what the first instance promised: the READ must be confirmed
    second = make_node("kv_producer", "prefill", clock, side_channel_port=port)
    try:
        assert second.worker.side_channel_port == port
        consumer.fake.cycles_before_xfer_done = 0
        _, _, errors = step_until(consumer, "d-1")  # no clock advance: no timeout involved
        assert errors == {2, 3, 4}
        reason = failure(consumer, "d-1")  # the first to tell: the new instance's answer, or
        assert "was restarted" in reason or "is gone" in reason  # the old one's closed socket
        detached = lambda: reader(consumer).engines.get("prefill") is None  # noqa: E731
        wait_for(detached, poll=consumer.step)  # once idle, to handshake afresh
    finally:
        second.worker.shutdown()


def test_unknown_request_is_asked_again_then_fails_at_the_timeout(
    producer: Node, consumer: Node, clock: FakeClock
) -> None:
    consumer.fake.cycles_before_xfer_done = 0
    consumer.step(load(producer.worker.side_channel_port, remote_rid="never-held"))
    confirmer = reader(consumer).confirmer
    wait_for(
        lambda: confirmer.num_queries >= 3, poll=lambda: (clock.advance(0.05), consumer.step())
    )
    assert reader(consumer).num_inflight == 1  # still asking, not reported
    clock.advance(100)
    _, recving, errors = consumer.step()
    assert recving == {"d-1"} and errors == {2, 3, 4}
    assert "timed out after 100s (lease confirmation)" in failure(consumer, "d-1")
    assert confirmer.num_open == 0


def test_lease_starting_after_the_read_is_confirmed_once_it_starts(
    producer: Node, consumer: Node, clock: FakeClock
) -> None:
    consumer.fake.cycles_before_xfer_done = 0
    consumer.step(load(producer.worker.side_channel_port))
    confirmer = reader(consumer).confirmer
    wait_for(
        lambda: confirmer.num_queries >= 2, poll=lambda: (clock.advance(0.05), consumer.step())
    )
    hold(producer)  # the SendSpec reached the producer's worker late
    _, _, errors = step_until(consumer, "d-1", clock, tick=0.05)
    assert errors == set()


def test_abort_while_confirming_is_reported_at_once_without_errors(
    producer: Node, consumer: Node
) -> None:
    consumer.fake.cycles_before_xfer_done = 0
    consumer.step(load(producer.worker.side_channel_port, remote_rid="never-held"))
    wait_for(lambda: reader(consumer).confirmer.num_open == 1, poll=consumer.step)
    abort = NixlConnectorMetadata(reqs_aborted={"d-1": True})
    assert consumer.step(abort) == (frozenset(), frozenset({"d-1"}), set())
    assert reader(consumer).confirmer.num_open == 0 and reader(consumer).num_inflight == 0


@pytest.mark.parametrize("kind", ["done", "release"])
def test_done_counts_as_held_but_an_earlier_release_does_not(
    producer: Node, consumer: Node, kind: Any
) -> None:
    hold(producer)
    producer.worker.leases.complete("p-1", now=0.0, kind=kind)
    consumer.fake.cycles_before_xfer_done = 0
    consumer.step(load(producer.worker.side_channel_port))
    _, _, errors = step_until(consumer, "d-1")
    assert errors == (set() if kind == "done" else {2, 3, 4})
