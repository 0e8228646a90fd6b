"""The consumer's heartbeat follows the lease each producer announces at the handshake.

Workers on FakeNixlWrapper with an injected clock; real side channels on 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from nixl_helpers import FakeClock, Node, make_node, serving, wait_for
from worker_steps import got_recving, hold, recv, run_until

from kvbridge.nixl import stats as keys
from kvbridge.nixl.metadata import NixlWorkerMetadata, decode_notif, encode_notif
from kvbridge.nixl.remotes import RemoteEngine


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def producer(clock: FakeClock) -> Iterator[Node]:
    """A producer with a 2 s lease: with the old 5 s default heartbeat, refused outright."""
    yield from serving(make_node("kv_producer", "prefill", clock, kv_lease_duration_s=2))


def remote(node: Node) -> RemoteEngine | None:
    reader = node.worker.registered.reader
    assert reader is not None
    return reader.engines.get("prefill")


def beats(node: Node) -> int:
    return sum(1 for _, m in node.sent_notifs if decode_notif(m).kind == "heartbeat")


def test_the_producer_announces_its_lease_and_the_consumer_beats_three_times_per_lease(
    clock: FakeClock, producer: Node
) -> None:
    md = producer.worker.get_handshake_metadata()
    assert md is not None and md.kv_lease_duration_s == 2.0
    consumer = make_node("kv_consumer", "decode", clock, cycles=10_000, transfer_timeout_s=100)
    try:
        hold(producer, lease_s=2.0)
        consumer.step(recv(producer.worker.side_channel_port))
        wait_for(lambda: consumer.fake.num_live_xfer_handles == 1, poll=consumer.step)
        attached = remote(consumer)
        assert attached is not None and attached.heartbeat_s == pytest.approx(2 / 3)
        first = beats(consumer)
        for _ in range(6):  # 2.4 s of a READ in flight, stepped every 0.4 s
            clock.advance(0.4)
            consumer.step()
        assert beats(consumer) - first == 3  # at 0.8, 1.6 and 2.4 s: every lapse is covered
    finally:
        consumer.worker.shutdown()


def test_a_configured_heartbeat_slower_than_the_producers_lease_is_refused_at_the_handshake(
    clock: FakeClock, producer: Node
) -> None:
    consumer = make_node("kv_consumer", "decode", clock, heartbeat_interval_s=5)
    try:
        meta = recv(producer.worker.side_channel_port)
        _, _, errors = run_until(consumer, got_recving("d-1"), meta=meta)[-1]
        assert errors == {2, 3, 4}
        worker_meta = consumer.worker.build_connector_worker_meta()
        assert isinstance(worker_meta, NixlWorkerMetadata)
        assert (
            "heartbeat_interval_s (5) is not below the producer's kv_lease_duration_s (2)"
            in worker_meta.load_failures["d-1"]
        )
        assert consumer.fake.calls_to("add_remote_agent") == [] and remote(consumer) is None
        stats = consumer.worker.get_kv_connector_stats()
        assert stats is not None and stats.data[keys.FAILED_HANDSHAKES] == 1
    finally:
        consumer.worker.shutdown()


def test_a_lease_heartbeated_forever_does_not_hold_back_the_others_expiry(
    clock: FakeClock,
) -> None:
    """vLLM #58222: its reaper stopped at the first unexpired entry, in insertion order, so a
    request heartbeated at the head kept every expired hold behind it. Here the first lease is
    renewed every 10 s; the four started after it lapse on time, at 30 s, and it lapses at its
    hard cap (60 s). Checked against a broken build (``LeaseTable.expire`` stopping at the first
    live lease): this test fails."""
    producer = make_node("kv_producer", "prefill", clock)  # holds: 30 s lease, 60 s cap
    try:
        rids = [f"p-{i}" for i in range(5)]
        for rid in rids:  # p-0 first: the head of every insertion-ordered table
            hold(producer, rid)
        freed: dict[str, float] = {}
        start = clock.now
        while len(freed) < len(rids):
            assert clock.now - start < 70, f"never freed: {sorted(set(rids) - set(freed))}"
            clock.advance(0.5)
            if (clock.now - start) % 10 == 0:
                producer.fake.deliver_notif("decode", encode_notif("heartbeat", ["p-0"]))
            sending, _, _ = producer.step(finished=frozenset(rids))
            freed.update({rid: clock.now - start for rid in sending})
        assert {rid: freed[rid] for rid in rids[1:]} == dict.fromkeys(rids[1:], 30.0)
        assert freed["p-0"] == 60.0  # renewed to the end, then the hard cap
        assert producer.worker.leases.num_expired_total == 5
    finally:
        producer.worker.shutdown()


def test_a_failed_read_does_not_stop_the_heartbeat_of_the_loads_still_reading(
    clock: FakeClock, producer: Node
) -> None:
    """One READ from a producer ends in ERR (its engine is marked stale, to be handshaken afresh
    once idle); another load still reading from it keeps renewing its lease. Checked against
    the build that skipped stale engines' heartbeats: no heartbeat left, the lease lapsed."""
    consumer = make_node("kv_consumer", "decode", clock, cycles=10_000, transfer_timeout_s=100)
    try:
        port = producer.worker.side_channel_port
        hold(producer, "p-1", lease_s=2.0)
        hold(producer, "p-2", lease_s=2.0)
        consumer.step(recv(port, rid="d-1", remote_rid="p-1"))
        wait_for(lambda: consumer.fake.num_live_xfer_handles == 1, poll=consumer.step)
        consumer.fake.fail_next_xfers(1)
        second = recv(port, rid="d-2", remote_rid="p-2", local=[8, 9, 10], remote=[11, 12, 13])
        run_until(consumer, got_recving("d-2"), meta=second)
        attached = remote(consumer)
        assert attached is not None and attached.stale and consumer.worker.num_inflight_loads == 1
        first = beats(consumer)
        renewed: list[list[str]] = []
        for _ in range(6):  # 2.4 s of d-1's READ in flight, stepped every 0.4 s
            clock.advance(0.4)
            consumer.step()
        for _, m in consumer.sent_notifs:
            notif = decode_notif(m)
            if notif.kind == "heartbeat":
                renewed.append(notif.request_ids)
        assert beats(consumer) - first == 3 and renewed[-1] == ["p-1"]  # every lapse covered
    finally:
        consumer.worker.shutdown()
