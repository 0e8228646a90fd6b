"""A consumer lands a READ on the producer's lease board word without waiting for the lease
answer, and only then: a zeroed word (the lease ended mid-READ), a failed board READ, a full
bucket or no board at all leave the verdict to the answer.

Workers on one ``FakeFabric`` (READs, board READs included, copy real bytes in-process) with a
clock that stands still; real zmq side channels. ``answers_held`` keeps the producer's side
channel from answering lease questions, so a load that lands did so on the board alone.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from nixl_helpers import FakeClock, config, kv_caches, notifier_of, spec, wait_for
from worker_steps import Step, step

from kvbridge.nixl import stats as keys
from kvbridge.nixl.fake_fabric import FabricNixlWrapper, FakeFabric
from kvbridge.nixl.leases import LeaseStatus, LeaseTable
from kvbridge.nixl.metadata import (
    NixlConnectorMetadata,
    NixlWorkerMetadata,
    RecvSpec,
    SendSpec,
    blocks_digest,
    decode_notif,
    prompt_hash,
)
from kvbridge.nixl.transport import LiveCounts, NixlTransportError, XferHandle, XferState
from kvbridge.nixl.worker import NixlWorker

HELD = [5, 6, 7]
LOCAL = [2, 3, 4]
PROMPT = prompt_hash(list(range(12)))


class Peers:
    """A producer (cache filled with layer index + 1) and a consumer on one fabric."""

    def __init__(
        self,
        clock: FakeClock,
        p_extra: dict[str, Any] | None = None,
        d_transport: type[FabricNixlWrapper] | None = None,
        **d_extra: Any,
    ) -> None:
        """``d_transport``: the consumer's fabric agent class (its READs done at 0 polls)."""
        self.fabric = FakeFabric(cycles_before_xfer_done=1)
        self.p = self._worker("kv_producer", "prefill", clock, **(p_extra or {}))
        if d_transport is not None:
            cls = d_transport
            d_extra["nixl_wrapper"] = lambda name: cls(name, self.fabric, cycles_before_xfer_done=0)
        self.d = self._worker("kv_consumer", "decode", clock, **d_extra)
        self.p_cache, self.d_cache = kv_caches(spec(), fill=1.0), kv_caches(spec())
        self.p.register_kv_caches(self.p_cache)
        self.d.register_kv_caches(self.d_cache)
        self.d_fake = self.fabric.agents[self.d.agent_name]

    def _worker(self, role: str, engine_id: str, clock: FakeClock, **extra: Any) -> NixlWorker:
        extra.setdefault("nixl_wrapper", self.fabric.wrapper)
        cfg = config(role, engine_id, **extra)
        return NixlWorker(cfg, spec(), clock=clock)

    def hold(self, rid: str = "p-1") -> None:
        send = SendSpec(
            request_id=rid,
            num_blocks=len(HELD),
            lease_duration_s=30.0,
            abort_timeout_s=60.0,
            block_ids=(HELD,),
            prompt_hash=PROMPT,
        )
        step(self.p, NixlConnectorMetadata(reqs_to_send={rid: send}), frozenset({rid}))

    def load(self, rid: str = "d-1", remote_rid: str = "p-1") -> NixlConnectorMetadata:
        recv = RecvSpec(
            request_id=rid,
            local_block_ids=(LOCAL,),
            remote_engine_id="prefill",
            remote_host="127.0.0.1",
            remote_port=self.p.side_channel_port or 1,
            remote_block_ids=(HELD,),
            remote_request_id=remote_rid,
            prompt_hash=PROMPT,
            remote_blocks_digest=blocks_digest((HELD,)),
        )
        return NixlConnectorMetadata(reqs_to_recv={rid: recv})

    def sent_notifs(self) -> list[tuple[str, bytes]]:
        """What the consumer notified (through its notification agent, none through d_fake)."""
        assert not self.d_fake.sent_notifs
        return notifier_of(self.d).sent_notifs

    def stats(self) -> dict[str, Any]:
        taken = self.d.get_kv_connector_stats()
        return {} if taken is None else dict(taken.data)

    def landed_the_producers_bytes(self) -> bool:
        return all(
            torch.equal(self.d_cache[name][LOCAL], self.p_cache[name][HELD])
            for name in self.d_cache
        )

    def close(self) -> None:
        for worker in (self.d, self.p):
            worker.shutdown()
            assert worker.leaked == LiveCounts(0, 0, 0, 0)


@contextmanager
def answers_held(leases: LeaseTable) -> Iterator[threading.Event]:
    """The producer's side-channel thread blocks in every lease question until the block
    ends (or the event is set): no answer reaches the consumer meanwhile."""
    release = threading.Event()
    real = leases.status

    def blocked(request_id: str, now: float | None) -> LeaseStatus:
        release.wait(10)
        return real(request_id, now)

    leases.status = blocked  # type: ignore[method-assign]
    try:
        yield release
    finally:
        release.set()
        del leases.status  # type: ignore[method-assign]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def peers(clock: FakeClock) -> Iterator[Peers]:
    pair = Peers(clock)
    yield pair
    pair.close()


def attached(peers: Peers) -> None:
    """A first load (answers flowing) attaches the producer: handshake done."""
    peers.hold("p-0")
    meta = peers.load("d-0", "p-0")
    got: list[Step] = [step(peers.d, meta)]
    wait_for(lambda: "d-0" in got[-1][1], poll=lambda: got.append(step(peers.d)))
    assert got[-1][2] == set()
    peers.stats()  # forget the first load's counts


def test_a_read_lands_on_the_board_word_without_waiting_for_the_answer(peers: Peers) -> None:
    attached(peers)
    peers.hold()
    board = peers.p.leases.board
    assert board is not None and board.num_used == 1
    with answers_held(peers.p.leases):
        got = [step(peers.d, peers.load())]  # question sent, READ posted
        wait_for(lambda: "d-1" in got[-1][1], poll=lambda: got.append(step(peers.d)))
        assert got[-1][2] == set() and peers.landed_the_producers_bytes()
        reader = peers.d.registered.reader
        assert reader is not None and reader.confirmer.num_open == 0  # question dropped
        stats = peers.stats()
        assert stats[keys.BOARD_CONFIRMS] == 1 and keys.BOARD_MISSES not in stats
        assert len(stats[keys.BOARD_READ_TIME]) == 1 and keys.CONFIRM_TIME not in stats
    sent = [decode_notif(m) for agent, m in peers.sent_notifs() if agent == peers.p.agent_name]
    assert (sent[-1].kind, sent[-1].request_ids) == ("done", ["p-1"])  # after the board READ
    wait_for(lambda: "p-1" in step(peers.p, finished=frozenset({"p-1"}))[0])
    assert board.num_used == 0 and not board.words.any()  # zeroed, then freed
    peers.d.check_integrity()
    peers.p.check_integrity()


def test_control_a_word_zeroed_mid_read_does_not_land_without_the_answer(
    peers: Peers, clock: FakeClock
) -> None:
    """The lease lapses while the READ is in flight (P zeroes the word, then frees the
    blocks): the board READ after it finds 0, the load waits for the answer, which says
    "expired": a load error. Checked against broken builds (any bucket read as "mine"; a
    lapse that does not zero the word): the load lands on the freed blocks and this fails."""
    attached(peers)
    peers.hold()
    peers.d_fake.cycles_before_xfer_done = 10**9
    with answers_held(peers.p.leases) as release:
        step(peers.d, peers.load())
        assert peers.d_fake.num_live_xfer_handles == 1  # the READ is in flight
        clock.advance(31)  # no heartbeat reaches P: its lease lapses, its word goes to 0
        assert step(peers.p, finished=frozenset())[0] == {"p-1"}
        peers.d_fake.cycles_before_xfer_done = 1
        for _ in range(5):  # READ done, board READ done: nothing lands on the board alone
            _, recving, _ = step(peers.d)
            assert "d-1" not in recving
        stats = peers.stats()
        assert stats[keys.BOARD_MISSES] == 1 and keys.BOARD_CONFIRMS not in stats
        release.set()  # the answer comes: "expired"
        got = [step(peers.d)]
        wait_for(lambda: "d-1" in got[-1][1], poll=lambda: got.append(step(peers.d)))
    assert got[-1][2] == set(LOCAL)
    meta = peers.d.build_connector_worker_meta()
    assert isinstance(meta, NixlWorkerMetadata) and "expired" in meta.load_failures["d-1"]


def lands_on_the_answer(peers: Peers) -> dict[str, Any]:
    """Load p-1 with the answers held back: it must not land before they flow; then it lands
    (the answer "held" covers the READ: the clock stands still). Its stats."""
    with answers_held(peers.p.leases) as release:
        got = [step(peers.d, peers.load())]
        for _ in range(5):  # the READ (and any board READ) ends; no landing yet
            got.append(step(peers.d))
        assert all("d-1" not in g[1] for g in got)
        release.set()
        wait_for(lambda: "d-1" in got[-1][1], poll=lambda: got.append(step(peers.d)))
    assert got[-1][2] == set() and peers.landed_the_producers_bytes()
    stats = peers.stats()
    assert keys.BOARD_CONFIRMS not in stats
    return stats


def test_a_failed_board_read_leaves_it_to_the_answer(peers: Peers) -> None:
    attached(peers)
    peers.hold()
    real = peers.d_fake.make_prepped_xfer

    def board_reads_fail(*args: Any, **kwargs: Any) -> Any:
        handle = real(*args, **kwargs)
        if len(args[2]) == 1:  # one window: a board READ (the data READ has 3 x 2 indices)
            peers.d_fake.fail_xfer(handle)
        return handle

    peers.d_fake.make_prepped_xfer = board_reads_fail  # type: ignore[method-assign]
    stats = lands_on_the_answer(peers)
    assert stats[keys.BOARD_MISSES] == 1 and stats[keys.CONFIRMS_WITH_READ] == 1
    # a failed transfer like a failed data READ: the producer is handshaken afresh once idle
    assert stats[keys.FAILED_TRANSFERS] == 1
    reader = peers.d.registered.reader
    assert reader is not None
    wait_for(lambda: reader.engines.get("prefill") is None, poll=lambda: step(peers.d))
    peers.d.check_integrity()  # its window is back, its handle released


def test_a_failed_board_read_whose_handle_is_not_released_still_marks_the_producer(
    peers: Peers,
) -> None:
    """The board READ ends in ERR and releasing its handle fails once (the load lets go of
    the producer, the retried handle keeps it bound): the producer is still handshaken
    afresh once that handle is released."""
    attached(peers)
    peers.hold()
    real = peers.d_fake.make_prepped_xfer

    def board_reads_fail(*args: Any, **kwargs: Any) -> Any:
        handle = real(*args, **kwargs)
        if len(args[2]) == 1:  # a board READ: it fails, and so does its handle's release
            peers.d_fake.fail_xfer(handle)
            peers.d_fake.fail_next_call("release_xfer_handle")
        return handle

    peers.d_fake.make_prepped_xfer = board_reads_fail  # type: ignore[method-assign]
    stats = lands_on_the_answer(peers)
    assert stats[keys.FAILED_TRANSFERS] == 1
    reader = peers.d.registered.reader
    assert reader is not None
    wait_for(lambda: reader.engines.get("prefill") is None, poll=lambda: step(peers.d))
    peers.d.check_integrity()
    # the retried release freed the handle: its window is handed out again, not lost for good
    assert reader.boards is not None and reader.boards.num_taken == 0


def test_a_load_whose_board_read_failed_and_then_timed_out_is_one_failure(
    peers: Peers, clock: FakeClock
) -> None:
    """Every failed load counts once across the failure keys: its failed board READ and
    the timeout that ends it after are one load lost, not two."""
    attached(peers)
    peers.hold()
    real = peers.d_fake.make_prepped_xfer

    def board_reads_fail(*args: Any, **kwargs: Any) -> Any:
        handle = real(*args, **kwargs)
        if len(args[2]) == 1:  # one window: a board READ
            peers.d_fake.fail_xfer(handle)
        return handle

    peers.d_fake.make_prepped_xfer = board_reads_fail  # type: ignore[method-assign]
    with answers_held(peers.p.leases):
        got = [step(peers.d, peers.load())]
        for _ in range(5):
            got.append(step(peers.d))
        clock.advance(3600.0)  # past any transfer timeout: the load fails in "confirm"
        wait_for(lambda: "d-1" in got[-1][1], poll=lambda: got.append(step(peers.d)))
    assert got[-1][2] == set(LOCAL)  # its blocks are load errors: the step recomputes
    stats = peers.stats()
    failures = (keys.FAILED_TRANSFERS, keys.FAILED_CONFIRMS, keys.FAILED_HANDSHAKES)
    assert sum(stats.get(k, 0) for k in failures) == 1
    assert stats[keys.FAILED_TRANSFERS] == 1  # the first failure names it


def test_a_lease_whose_bucket_was_full_lands_on_the_answer(clock: FakeClock) -> None:
    peers = Peers(clock, {"lease_board_slots": 8})  # one bucket of 8 words
    try:
        attached(peers)
        for i in range(8):  # every slot taken (p-0's lease ended with its load)
            peers.hold(f"f-{i}")
        peers.hold()
        taken = peers.p.get_kv_connector_stats()
        assert taken is not None and taken.data[keys.BOARD_FULL] == 1
        stats = lands_on_the_answer(peers)
        assert stats[keys.BOARD_MISSES] == 1  # other leases' words: proves nothing
    finally:
        peers.close()


@pytest.mark.parametrize("side", ["producer", "consumer"])
def test_without_a_board_on_either_side_loads_ask_as_before(clock: FakeClock, side: str) -> None:
    off = {"lease_board_slots": 0}
    peers = Peers(clock, off) if side == "producer" else Peers(clock, None, **off)
    try:
        attached(peers)
        peers.hold()
        stats = lands_on_the_answer(peers)
        assert keys.BOARD_MISSES not in stats and keys.BOARD_READ_TIME not in stats
        assert len(peers.d_fake.calls_to("make_prepped_xfer")) == 2  # data READs only
        reader = peers.d.registered.reader
        assert reader is not None and (reader.boards is None) == (side == "consumer")
        assert peers.p.get_handshake_metadata().lease_board is None or side == "consumer"  # type: ignore[union-attr]
    finally:
        peers.close()


def test_a_load_aborted_while_its_board_read_runs_says_done_and_releases_all(
    peers: Peers,
) -> None:
    attached(peers)
    peers.hold()
    real = peers.d_fake.check_xfer_state
    board_handles: set[int] = set()

    def board_stays_in_flight(handle: Any) -> Any:
        return "PROC" if handle in board_handles else real(handle)

    real_make = peers.d_fake.make_prepped_xfer

    def note_board(*args: Any, **kwargs: Any) -> Any:
        handle = real_make(*args, **kwargs)
        if len(args[2]) == 1:
            board_handles.add(handle)
        return handle

    peers.d_fake.make_prepped_xfer = note_board  # type: ignore[method-assign]
    peers.d_fake.check_xfer_state = board_stays_in_flight  # type: ignore[method-assign]
    with answers_held(peers.p.leases):
        step(peers.d, peers.load())
        wait_for(lambda: bool(board_handles), poll=lambda: step(peers.d))
        reader = peers.d.registered.reader
        assert reader is not None and reader.boards is not None
        assert reader.boards.num_taken == 1 and peers.d_fake.num_live_xfer_handles == 1
        _, recving, errors = step(peers.d, NixlConnectorMetadata(reqs_aborted={"d-1": True}))
    assert "d-1" in recving and errors == set()
    assert reader.boards.num_taken == 0 and peers.d_fake.num_live_xfer_handles == 0
    sent = [decode_notif(m) for agent, m in peers.sent_notifs() if agent == peers.p.agent_name]
    assert (sent[-1].kind, sent[-1].request_ids) == ("done", ["p-1"])
    peers.d.check_integrity()


class DoneInTransfer(FabricNixlWrapper):
    """A consumer transport whose READs complete inside ``transfer``, as UCX's cma does on
    loopback (the copy is made in the post)."""

    def transfer(self, handle: XferHandle) -> XferState:
        state = super().transfer(handle)
        return self.check_xfer_state(handle) if state == "PROC" else state


def test_a_read_done_in_its_post_and_proven_by_the_board_asks_no_question(
    clock: FakeClock,
) -> None:
    peers = Peers(clock, d_transport=DoneInTransfer)
    try:
        attached(peers)
        peers.hold()
        reader = peers.d.registered.reader
        assert reader is not None
        asked = reader.confirmer.num_queries
        telemetry = len(peers.d_fake.calls_to("get_xfer_telemetry"))
        _, recving, errors = step(peers.d, peers.load())  # lands in the step that posts it
        assert recving == {"d-1"} and errors == set() and peers.landed_the_producers_bytes()
        assert reader.confirmer.num_queries == asked and reader.confirmer.num_sockets == 0
        stats = peers.stats()
        assert stats[keys.BOARD_CONFIRMS] == 1 and len(stats[keys.XFER_TIME]) == 1
        # the READ ran inside its post: the post's time is its time, no telemetry asked
        assert len(peers.d_fake.calls_to("get_xfer_telemetry")) == telemetry
    finally:
        peers.close()


def test_a_read_done_in_its_post_that_the_board_does_not_prove_asks_after_it(
    clock: FakeClock,
) -> None:
    """The lease lapsed before the READ (its word is 0): asked after the READ, the producer
    answers "expired" and the load fails."""
    peers = Peers(clock, d_transport=DoneInTransfer)
    try:
        attached(peers)
        peers.hold()
        clock.advance(31)
        assert step(peers.p, finished=frozenset())[0] == {"p-1"}
        got = [step(peers.d, peers.load())]
        reader = peers.d.registered.reader
        assert reader is not None and reader.confirmer.is_open("d-1")  # asked after the READ
        wait_for(lambda: "d-1" in got[-1][1], poll=lambda: got.append(step(peers.d)))
        assert got[-1][2] == set(LOCAL)
        stats = peers.stats()
        assert stats[keys.BOARD_MISSES] == 1 and stats[keys.FAILED_CONFIRMS] == 1
    finally:
        peers.close()


@pytest.mark.parametrize("refused", [0, 3])
def test_a_read_timed_out_in_flight_is_cancelled_before_the_producer_hears_release(
    peers: Peers, clock: FakeClock, refused: int
) -> None:
    """ "release" lets P free (and reuse) the blocks: a READ still running into D's blocks must
    be cancelled (its handle released) first, or it may copy P's reused blocks. When NIXL
    refuses the cancel (``refused`` times: its backend still runs the READ), the load drains:
    neither "release" nor the blocks handed back to the engine until it is cancelled. Checked
    against the build that sent "release" and reported the load at the first refusal."""
    attached(peers)
    peers.hold()
    events: list[str] = []
    data_handles: set[int] = set()
    d_fake, notify = peers.d_fake, peers.fabric.agents[peers.d.agent_name + "-notify"]
    real_make, real_state = d_fake.make_prepped_xfer, d_fake.check_xfer_state
    real_release = d_fake.release_xfer_handle
    refusals = [refused]

    def note_data(*args: Any, **kwargs: Any) -> Any:
        handle = real_make(*args, **kwargs)
        if len(args[2]) != 1:  # not a board READ (one window)
            data_handles.add(handle)
        return handle

    def data_stays_in_flight(handle: Any) -> Any:
        return "PROC" if handle in data_handles else real_state(handle)

    def note_release(handle: Any) -> None:
        if handle in data_handles and refusals[0] > 0:
            refusals[0] -= 1
            events.append("cancel refused")
            raise NixlTransportError("release_xfer_handle: REPOST_ACTIVE", "REPOST_ACTIVE")
        real_release(handle)
        if handle in data_handles:
            events.append("READ released")

    for agent in (d_fake, notify):
        real_send = agent.send_notif

        def note_send(remote: str, msg: bytes, send: Any = real_send) -> None:
            events.append(decode_notif(msg).kind)
            send(remote, msg)

        agent.send_notif = note_send  # type: ignore[method-assign,assignment]
    d_fake.make_prepped_xfer = note_data  # type: ignore[method-assign]
    d_fake.check_xfer_state = data_stays_in_flight  # type: ignore[method-assign]
    d_fake.release_xfer_handle = note_release  # type: ignore[method-assign]
    got = [step(peers.d, peers.load())]
    for _ in range(3):
        got.append(step(peers.d))
    assert data_handles and "d-1" not in got[-1][1]  # the READ is in flight
    clock.advance(3600.0)  # past the transfer timeout: the load fails in "read"
    drained = 0  # steps after which the READ was still not cancelled
    while refusals[0] > 0:  # the cancel is refused: nothing reported, nothing released
        got.append(step(peers.d))
        if "READ released" not in events:
            drained += 1
            assert "d-1" not in got[-1][1] and not got[-1][2], events
            assert "release" not in events and peers.d.registered.reader is not None
            peers.d.registered.reader.check_integrity()
    assert drained >= (refused > 0)
    wait_for(lambda: "d-1" in got[-1][1], poll=lambda: got.append(step(peers.d)))
    assert got[-1][2] == set(LOCAL)
    assert [e for e in events if e in ("cancel refused", "READ released", "release")] == [
        *["cancel refused"] * refused,
        "READ released",
        "release",
    ], events
