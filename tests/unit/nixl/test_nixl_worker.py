"""NixlWorker on FakeNixlWrapper, with a real side channel on 127.0.0.1 and an injected clock."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from nixl_helpers import (
    FakeClock,
    Node,
    config,
    kv_caches,
    make_node,
    silent_port,
    spec,
    wait_for,
)
from worker_steps import as_tuple, got_recving, hold, recv, run_until, send

from kvbridge.config import ConfigError
from kvbridge.nixl import stats as keys
from kvbridge.nixl.metadata import (
    NixlConnectorMetadata,
    NixlWorkerMetadata,
    decode_notif,
    encode_notif,
)
from kvbridge.nixl.transport import LiveCounts
from kvbridge.nixl.worker import NixlWorker

ZERO = LiveCounts(0, 0, 0, 0)
LAYER_BLOCK_BYTES = spec().block_bytes_per_layer


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def nodes(clock: FakeClock, request: pytest.FixtureRequest) -> Iterator[tuple[Node, Node]]:
    cycles = getattr(request, "param", 3)
    producer = make_node("kv_producer", "prefill", clock)
    consumer = make_node("kv_consumer", "decode", clock, cycles=cycles)
    yield producer, consumer
    for node in (consumer, producer):
        node.worker.shutdown()
        assert node.worker.leaked == ZERO


# -- consumer ----------------------------------------------------------------------------------
def test_read_completes_after_n_polls_with_one_merged_descriptor_per_layer(
    nodes: tuple[Node, Node],
) -> None:
    producer, consumer = nodes
    hold(producer)
    first = consumer.step(recv(producer.worker.side_channel_port))
    assert first == (frozenset(), frozenset(), set())
    results = run_until(consumer, got_recving("d-1"))
    fake = consumer.fake
    assert len(fake.calls_to("check_xfer_state")) == 3 + 1  # 3 x PROC, then DONE
    assert all(r[1] == frozenset() for r in results[:-1])
    assert results[-1][2] == set()  # no load errors
    assert consumer.worker.take_failed_recving() == set()
    ((op, _, local_idx, _, remote_idx, notif), _) = fake.calls_to("make_prepped_xfer")[0]
    n = consumer.worker.cache_spec.num_blocks  # per-block dlists: index = layer * n + block
    assert op == "READ" and list(local_idx) == [2, 3, 4, n + 2, n + 3, n + 4]
    assert list(remote_idx) == [5, 6, 7, n + 5, n + 6, n + 7]  # each run consecutive: NIXL joins it
    # the cache's and the board READ windows', the remote's blocks' and lease board's, once
    assert len(fake.calls_to("prep_xfer_dlist")) == 4
    assert notif == b""  # the READ carries no notification: NIXL would hold DONE back for it
    assert not fake.sent_notifs  # the READ agent notifies nothing: the notification agent does
    sent = [as_tuple(m) for agent, m in consumer.sent_notifs if agent == "fake-remote"]
    assert sent[-1] == ("done", ["p-1"])  # sent once the READ was seen done
    stats = consumer.worker.get_kv_connector_stats()
    assert stats is not None
    assert stats.data[keys.NUM_TRANSFERS] == 1
    assert stats.data[keys.BYTES] == [6 * LAYER_BLOCK_BYTES]
    assert stats.data[keys.NUM_DESCRIPTORS] == [2]
    assert fake.num_live_xfer_handles == 0
    assert fake.num_live_dlist_handles == 4  # the prepared lists stay
    consumer.worker.check_integrity()


def test_scattered_blocks_read_through_the_prepared_lists(nodes: tuple[Node, Node]) -> None:
    producer, consumer = nodes
    hold(producer)
    run_until(
        consumer,
        got_recving("d-1"),
        meta=recv(producer.worker.side_channel_port, local=[9, 2, 4], remote=[1, 8, 3]),
    )
    ((_, _, local_idx, _, remote_idx, _), _) = consumer.fake.calls_to("make_prepped_xfer")[0]
    n = spec().num_blocks
    assert list(local_idx) == [9, 2, 4, n + 9, n + 2, n + 4]
    assert list(remote_idx) == [1, 8, 3, n + 1, n + 8, n + 3]


@pytest.mark.parametrize("on_post", [False, True])
def test_err_marks_load_errors_and_finishes_receiving(
    nodes: tuple[Node, Node], on_post: bool
) -> None:
    producer, consumer = nodes
    consumer.fake.fail_next_xfers(1, on_post=on_post)
    results = run_until(consumer, got_recving("d-1"), meta=recv(producer.worker.side_channel_port))
    assert results[-1][2] == {2, 3, 4}
    meta = consumer.worker.build_connector_worker_meta()
    assert isinstance(meta, NixlWorkerMetadata) and "ERR" in meta.load_failures["d-1"]
    assert consumer.worker.take_failed_recving() == {"d-1"}  # by id (hybrid caches)
    assert consumer.worker.take_failed_recving() == set()  # once
    stats = consumer.worker.get_kv_connector_stats()
    assert stats is not None and stats.data[keys.FAILED_TRANSFERS] == 1
    assert consumer.fake.num_live_xfer_handles == 0
    released = [as_tuple(m) for _, m in consumer.sent_notifs]
    assert ("release", ["p-1"]) in released  # the producer may free at once
    # The failed engine is detached once idle and handshaken afresh for the next request.
    hold(producer, "p-2")
    run_until(
        consumer,
        got_recving("d-2"),
        meta=recv(producer.worker.side_channel_port, rid="d-2", remote_rid="p-2"),
    )
    assert len(consumer.fake.calls_to("remove_remote_agent")) == 1
    reg = producer.worker.registered
    assert reg.listener is not None and reg.listener.num_served == 2


def test_unreachable_producer_fails_the_load_not_the_engine(clock: FakeClock) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    consumer = make_node("kv_consumer", "decode", clock, transfer_timeout_s=0.3)
    try:
        results = run_until(consumer, got_recving("d-1"), meta=recv(dead_port))
        assert results[-1][2] == {2, 3, 4}
        meta = consumer.worker.build_connector_worker_meta()
        assert isinstance(meta, NixlWorkerMetadata) and "handshake" in meta.load_failures["d-1"]
    finally:
        consumer.worker.shutdown()
    assert consumer.worker.leaked == ZERO


def test_incompatible_producer_is_refused_and_the_load_fails(clock: FakeClock) -> None:
    producer = make_node("kv_producer", "prefill", clock, s=spec(head_dim=8))
    consumer = make_node("kv_consumer", "decode", clock)
    try:
        results = run_until(
            consumer, got_recving("d-1"), meta=recv(producer.worker.side_channel_port)
        )
        assert results[-1][2] == {2, 3, 4}
        meta = consumer.worker.build_connector_worker_meta()
        assert isinstance(meta, NixlWorkerMetadata)
        assert "compatibility hash mismatch" in meta.load_failures["d-1"]
        assert consumer.fake.calls_to("add_remote_agent") == []
    finally:
        consumer.worker.shutdown()
        producer.worker.shutdown()


@pytest.mark.parametrize("nodes", [10_000], indirect=True)
def test_stuck_read_times_out_sends_heartbeats_meanwhile_and_releases_its_handle(
    nodes: tuple[Node, Node], clock: FakeClock
) -> None:
    producer, consumer = nodes
    consumer.step(recv(producer.worker.side_channel_port))
    wait_for(lambda: consumer.fake.num_live_xfer_handles == 1, poll=consumer.step)
    beats = lambda: [m for _, m in consumer.sent_notifs if decode_notif(m).kind == "heartbeat"]  # noqa: E731
    assert len(beats()) == 1  # right after attaching
    clock.advance(5.0)
    consumer.step()
    assert [as_tuple(m) for m in beats()] == [("heartbeat", ["p-1"])] * 2
    clock.advance(25.5)
    _, recving, errors = consumer.step()
    assert recving == {"d-1"} and errors == {2, 3, 4}
    assert consumer.fake.num_live_xfer_handles == 0


def test_bad_remote_block_ids_fail_the_load(nodes: tuple[Node, Node]) -> None:
    """Out-of-range remote ids are refused before any READ is made. Checked against a broken
    build (``plan_read`` not checking the remote ids): a READ is then posted (NIXL's own index
    check happens to catch 99, not an id that lands in the next layer's blocks) and this test
    fails."""
    producer, consumer = nodes
    meta = recv(producer.worker.side_channel_port, remote=[5, 6, 99])
    results = run_until(consumer, got_recving("d-1"), meta=meta)
    assert results[-1][2] == {2, 3, 4}
    assert consumer.fake.calls_to("make_prepped_xfer") == []
    stats = consumer.worker.get_kv_connector_stats()  # a failed load counts once
    assert stats is not None and stats.data[keys.FAILED_TRANSFERS] == 1


def test_scheduler_planned_failure_is_reported_at_once(nodes: tuple[Node, Node]) -> None:
    _, consumer = nodes
    assert consumer.step(recv(None, fail_reason="too few blocks")) == (
        frozenset(),
        frozenset({"d-1"}),
        {2, 3, 4},
    )


@pytest.mark.parametrize("nodes", [10], indirect=True)
def test_request_aborted_mid_read_is_reported_once_the_read_ends(
    nodes: tuple[Node, Node],
) -> None:
    producer, consumer = nodes
    consumer.step(recv(producer.worker.side_channel_port))
    wait_for(lambda: consumer.fake.num_live_xfer_handles == 1, poll=consumer.step)
    abort = NixlConnectorMetadata(reqs_aborted={"d-1": True})
    sending, recving, errors = consumer.step(abort, finished=frozenset({"d-1"}))
    assert (sending, recving, errors) == (frozenset(), frozenset(), set())  # READ still writing
    results = run_until(consumer, got_recving("d-1"))
    assert all(r[0] == frozenset() and r[2] == set() for r in results)  # no load errors
    # An abort for a load that already ended is still answered (the engine waits for it).
    late = NixlConnectorMetadata(reqs_aborted={"gone": True})
    assert consumer.step(late)[1] == {"gone"}


@pytest.mark.parametrize("nodes", [10_000], indirect=True)
def test_a_load_preempted_mid_read_cancels_its_read_at_once(nodes: tuple[Node, Node]) -> None:
    """Preemption (an abort without a report) means the engine freed the blocks and may hand
    them to another request: the READ into them is cancelled in that step, not awaited, and
    the producer told "release". Checked against the build that waited for the READ: its
    handle stayed live, still writing into the freed blocks."""
    producer, consumer = nodes
    consumer.step(recv(producer.worker.side_channel_port))
    wait_for(lambda: consumer.fake.num_live_xfer_handles == 1, poll=consumer.step)
    preempt = NixlConnectorMetadata(reqs_aborted={"d-1": False})
    assert consumer.step(preempt) == (frozenset(), frozenset(), set())
    assert consumer.fake.num_live_xfer_handles == 0 and consumer.worker.num_inflight_loads == 0
    assert ("release", ["p-1"]) in [as_tuple(m) for _, m in consumer.sent_notifs]
    for _ in range(3):  # never reported: the engine does not wait for it
        assert consumer.step()[1] == frozenset()


def test_abort_before_the_handshake_ends_at_once_and_preemption_stays_silent(
    clock: FakeClock,
) -> None:
    consumer = make_node("kv_consumer", "decode", clock)
    try:
        with silent_port() as port:  # a producer that never answers: the handshake is pending
            consumer.step(recv(port, rid="d-1"))
            consumer.step(recv(port, rid="d-2"))
            aborts = NixlConnectorMetadata(reqs_aborted={"d-1": True, "d-2": False})
            assert consumer.step(aborts) == (frozenset(), frozenset({"d-1"}), set())
            assert consumer.worker.num_inflight_loads == 0
    finally:
        consumer.worker.shutdown()
    assert consumer.worker.leaked == ZERO


# -- producer ----------------------------------------------------------------------------------
def test_lease_lapses_without_heartbeats_and_counts_an_expiry(clock: FakeClock) -> None:
    producer = make_node("kv_producer", "prefill", clock)
    try:
        assert producer.step(send(), finished=frozenset({"p-1"})) == (
            frozenset(),
            frozenset(),
            set(),
        )
        assert producer.worker.leases.num_blocks_held == 3
        clock.advance(29.9)
        assert producer.step()[0] == frozenset()
        clock.advance(0.2)
        assert producer.step()[0] == {"p-1"}
        stats = producer.worker.get_kv_connector_stats()
        assert stats is not None and stats.data[keys.EXPIRED_REQS] == 1
        assert producer.worker.leases.num_live == 0
    finally:
        producer.worker.shutdown()


def test_heartbeats_renew_the_lease_up_to_the_hard_cap(clock: FakeClock) -> None:
    producer = make_node("kv_producer", "prefill", clock)
    try:
        producer.step(send(), finished=frozenset({"p-1"}))
        for _ in range(2):  # t = 20, 40: each beat moves expiry to beat + 30
            clock.advance(20)
            producer.fake.deliver_notif("decode", encode_notif("heartbeat", ["p-1"]))
            assert producer.step()[0] == frozenset()
        producer.worker.check_integrity()
        clock.advance(19)  # t = 59: alive thanks to the beat at 40
        assert producer.step()[0] == frozenset()
        producer.fake.deliver_notif("decode", encode_notif("heartbeat", ["p-1"]))
        assert producer.step()[0] == frozenset()
        clock.advance(1.5)  # t = 60.5: past abort_timeout_s=60 whatever the beats say
        assert producer.step()[0] == {"p-1"}
    finally:
        producer.worker.shutdown()


def test_done_notification_frees_blocks_only_for_scheduler_finished_ids(clock: FakeClock) -> None:
    producer = make_node("kv_producer", "prefill", clock)
    try:
        producer.step(send())
        producer.fake.deliver_notif("decode", encode_notif("done", ["p-1"]))
        assert producer.step()[0] == frozenset()  # the scheduler has not said it finished
        assert producer.step(finished=frozenset({"p-1"}))[0] == {"p-1"}
        # A completion that overtakes the SendSpec is kept and applied when the lease starts.
        producer.fake.deliver_notif("decode", encode_notif("release", ["p-2"]))
        assert producer.step()[0] == frozenset()
        assert producer.step(send("p-2"), finished=frozenset({"p-2"}))[0] == {"p-2"}
        stats = producer.worker.get_kv_connector_stats()
        assert stats is not None and stats.data[keys.NOTIFICATIONS_RECEIVED] == 2
        assert keys.EXPIRED_REQS not in stats.data
    finally:
        producer.worker.shutdown()


def test_garbage_notifications_are_counted_and_dropped(clock: FakeClock) -> None:
    producer = make_node("kv_producer", "prefill", clock)
    try:
        producer.step(send(), finished=frozenset({"p-1"}))
        producer.fake.deliver_notif("x", b"\xc1\x00junk")
        producer.fake.deliver_notif("x", encode_notif("done", ["p-1"]))
        assert producer.step()[0] == {"p-1"}
        stats = producer.worker.get_kv_connector_stats()
        assert stats is not None and stats.data[keys.FAILED_NOTIFICATIONS] == 1
    finally:
        producer.worker.shutdown()


def test_worker_announces_its_side_channel_once(clock: FakeClock) -> None:
    producer = make_node("kv_producer", "prefill", clock)
    try:
        meta = producer.worker.build_connector_worker_meta()
        assert isinstance(meta, NixlWorkerMetadata)
        assert meta.side_channel_port == producer.worker.side_channel_port != 0
        assert producer.worker.build_connector_worker_meta() is None
        md = producer.worker.get_handshake_metadata()
        assert md is not None and md.kv_base_addrs[1] == producer.cache["layers.1"].data_ptr()
    finally:
        producer.worker.shutdown()


# -- lifecycle ---------------------------------------------------------------------------------
@pytest.mark.parametrize("nodes", [10_000], indirect=True)
def test_shutdown_mid_flight_releases_everything_and_stops_threads(
    nodes: tuple[Node, Node],
) -> None:
    producer, consumer = nodes
    consumer.step(recv(producer.worker.side_channel_port))
    wait_for(lambda: consumer.fake.num_live_xfer_handles == 1, poll=consumer.step)
    producer.step(send(), finished=frozenset({"p-1"}))
    consumer.worker.shutdown()
    producer.worker.shutdown()
    consumer.worker.shutdown()  # idempotent
    assert consumer.worker.leaked == producer.worker.leaked == ZERO
    names = [t.name for t in threading.enumerate()]
    assert not [n for n in names if n.startswith(("kvbridge-handshake", "kvbridge-nixl-side"))]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c.pop("layers.1"), r"layers \['layers.1'\] missing"),
        (
            lambda c: c.update({"layers.9": torch.zeros(1)}),
            r"layers \['layers.9'\] not in the cache",
        ),
        (
            lambda c: c.update({"layers.0": torch.zeros(16, 2, 4, 2, 4, dtype=torch.float16)}),
            "float16",
        ),
        (
            lambda c: c.update({"layers.0": torch.zeros(16, 2, 4, 4, 2).transpose(3, 4)}),
            "dense run",
        ),
    ],
)
def test_kv_caches_must_match_the_declared_spec(mutate: Any, message: str) -> None:
    worker = NixlWorker(config("kv_both", "e"), spec())
    caches = kv_caches(spec())
    mutate(caches)
    with pytest.raises(ConfigError, match=message):
        worker.register_kv_caches(caches)
    worker.shutdown()
