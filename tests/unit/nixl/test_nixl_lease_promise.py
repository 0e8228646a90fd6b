"""The question asked with a READ, the one asked after it, and which answer proves what.

The consumer's clock ticks on every reading, as a real clock moves within a step (a frozen
fake clock cannot tell a question asked after the READ from one asked with it); the producer
keeps its own clock: only differences cross the wire.
"""

from __future__ import annotations

from collections.abc import Iterator

import msgspec
import pytest
from nixl_helpers import FakeClock, Node, make_node, serving, wait_for
from test_nixl_lease_confirm import hold, load, make_consumer, read_posted, reader, step_until

from kvbridge.nixl import stats as keys
from kvbridge.nixl.lease_confirm import LEASE_FRAME, LeaseAnswer
from kvbridge.nixl.leases import MAX_PROMISE_S

Step = tuple[frozenset[str], frozenset[str], set[int]]


class TickingClock(FakeClock):
    """Advances 1 ms on every reading."""

    def __call__(self) -> float:
        self.now += 0.001
        return self.now


@pytest.fixture
def pclock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cclock() -> TickingClock:
    return TickingClock(start=5000.0)


@pytest.fixture
def producer(pclock: FakeClock) -> Iterator[Node]:
    yield from serving(make_node("kv_producer", "prefill", pclock))


@pytest.fixture
def consumer(cclock: TickingClock) -> Iterator[Node]:
    yield from serving(make_consumer(cclock))


def read_outlasting_the_promise(producer: Node, consumer: Node, cclock: TickingClock) -> None:
    """The READ is answered "held" while it runs, then ends after the promise ran out."""
    hold(producer)
    read_posted(consumer, producer)
    wait_for(lambda: reader(consumer).confirmer.num_open == 0, poll=consumer.step)
    cclock.advance(MAX_PROMISE_S)
    consumer.fake.cycles_before_xfer_done = 0


def finish(consumer: Node, rid: str = "d-1") -> Step:
    last: list[Step] = []
    wait_for(lambda: bool(last) and rid in last[-1][1], poll=lambda: last.append(consumer.step()))
    return last[-1]


def test_held_after_the_read_lands_even_with_no_time_left(
    producer: Node, consumer: Node, cclock: TickingClock, pclock: FakeClock
) -> None:
    read_outlasting_the_promise(producer, consumer, cclock)
    pclock.advance(31)  # lapsed by the producer's clock, but it has not stepped: blocks intact
    _, _, errors = finish(consumer)  # the answer after the READ: "held", for 0 s more
    assert errors == set() and reader(consumer).confirmer.num_queries == 2
    stats = consumer.worker.get_kv_connector_stats()
    assert stats is not None and len(stats.data[keys.CONFIRM_TIME]) == 1
    assert keys.CONFIRMS_WITH_READ not in stats.data  # settled by the question after the READ


def test_done_after_the_read_lands_without_a_third_question(
    producer: Node, consumer: Node, cclock: TickingClock
) -> None:
    read_outlasting_the_promise(producer, consumer, cclock)
    producer.worker.leases.complete("p-1", now=0.0)  # the READ's "done" reached the producer
    _, _, errors = finish(consumer)
    assert errors == set() and reader(consumer).confirmer.num_queries == 2


def test_answers_without_a_promise_or_a_send_time_are_confirmed_after_the_read(
    producer: Node, consumer: Node
) -> None:
    listener = producer.worker.registered.listener
    assert listener is not None
    answer = listener._handlers[LEASE_FRAME]

    def older(payload: bytes) -> bytes:  # a producer that neither promises nor echoes sent_at
        a = msgspec.msgpack.decode(answer(payload), type=LeaseAnswer)
        return msgspec.msgpack.encode(
            LeaseAnswer(
                seq=a.seq, engine_id=a.engine_id, instance_id=a.instance_id, states=a.states
            )
        )

    listener._handlers[LEASE_FRAME] = older
    hold(producer)
    read_posted(consumer, producer)
    consumer.fake.cycles_before_xfer_done = 0
    _, _, errors = finish(consumer)
    assert errors == set() and reader(consumer).confirmer.num_queries <= 2


def test_notifications_sent_counts_what_was_sent(producer: Node, consumer: Node) -> None:
    hold(producer)
    consumer.fake.cycles_before_xfer_done = 0
    consumer.step(load(producer.worker.side_channel_port))
    _, _, errors = step_until(consumer, "d-1")
    assert errors == set()
    stats = consumer.worker.get_kv_connector_stats()
    assert stats is not None
    assert stats.data[keys.NOTIFICATIONS_SENT] == len(consumer.sent_notifs)
