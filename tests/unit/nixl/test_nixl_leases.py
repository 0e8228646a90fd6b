"""Lease outcomes on the producer, and the consumer's questions about them over a real socket."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import msgspec
import pytest
from nixl_helpers import spec, wait_for

from kvbridge.connector.stats import KVConnectorStats
from kvbridge.nixl.handshake import HandshakeListener, compat_hash
from kvbridge.nixl.lease_confirm import (
    LEASE_FRAME,
    MAX_IDS_PER_QUERY,
    LeaseAnswer,
    LeaseConfirmer,
    LeaseQuery,
    Settled,
    Verdict,
    lease_query_handler,
)
from kvbridge.nixl.leases import MAX_PROMISE_S, LeaseStatus, LeaseTable
from kvbridge.nixl.metadata import SendSpec, decode_notif, encode_notif
from kvbridge.nixl.producer import LeaseKeeper

HASH = compat_hash(spec())


def send(rid: str, lease_s: float = 30.0) -> SendSpec:
    return SendSpec(request_id=rid, num_blocks=2, lease_duration_s=lease_s, abort_timeout_s=60.0)


# -- LeaseTable ----------------------------------------------------------------------------------
def test_outcomes_follow_each_way_a_lease_can_end() -> None:
    table = LeaseTable()
    for rid in ("a", "b", "c"):
        table.start(send(rid), now=0.0)
    assert [table.outcome(r) for r in ("a", "b", "c", "never")] == ["held"] * 3 + ["unknown"]
    table.complete("a", now=1.0, kind="done")
    table.complete("b", now=1.0, kind="release")
    table.renew("c", now=25.0, lease_duration_s=30.0)
    assert table.expire(now=54.9, early_ttl_s=60) == []
    assert table.expire(now=55.0, early_ttl_s=60) == ["c"]
    assert [table.outcome(r) for r in ("a", "b", "c")] == ["done", "released", "expired"]
    assert table.take_finished({"a", "b", "c"}) == {"a", "b", "c"}
    # Reported and forgotten as holds, the outcomes stay answerable.
    assert [table.outcome(r) for r in ("a", "b", "c")] == ["done", "released", "expired"]
    # A late notification for an ended lease changes nothing and leaves no early entry behind.
    table.complete("c", now=56.0)
    assert table.outcome("c") == "expired" and not table.knows("c")
    table.check_integrity()


def test_an_early_completion_answers_before_and_after_its_lease_starts() -> None:
    table = LeaseTable()
    table.complete("x", now=0.0, kind="done")
    assert table.outcome("x") == "done"
    table.start(send("x"), now=1.0)
    assert table.outcome("x") == "done" and table.take_finished({"x"}) == {"x"}
    table.abandon(send("y"))
    assert table.outcome("y") == "expired" and table.take_finished({"y"}) == {"y"}
    table.check_integrity()


def test_an_idle_keeper_skips_its_step_but_never_a_lease_an_end_or_an_early_done() -> None:
    """``LeaseKeeper.finished`` returns at once while nothing is held, ended or early (every
    step of a consumer); otherwise it expires, reports and forgets early completions."""
    table = LeaseTable()
    keeper = LeaseKeeper(table, KVConnectorStats(), lease_duration_s=5.0, abort_timeout_s=10.0)
    assert not table.busy and keeper.finished(frozenset({"x"}), now=0.0) == set()
    table.complete("early", now=0.0)  # a done before its lease: kept, then forgotten
    assert table.busy and keeper.finished(frozenset(), now=11.0) == set() and not table.busy
    table.start(send("a", lease_s=5.0), now=20.0)
    assert table.busy and keeper.finished(frozenset({"a"}), now=21.0) == set()
    assert keeper.finished(frozenset(), now=26.0) == {"a"}  # lapsed, asked for before
    assert not table.busy
    table.start(send("b"), now=30.0)
    table.complete("b", now=31.0)
    assert keeper.finished(frozenset({"b"}), now=31.0) == {"b"} and not table.busy


def test_history_is_bounded_and_forgets_the_oldest_first() -> None:
    table = LeaseTable(history_size=3)
    for i in range(5):
        table.start(send(f"r{i}"), now=0.0)
        table.complete(f"r{i}", now=0.0)
    assert [table.outcome(f"r{i}") for i in range(5)] == ["unknown"] * 2 + ["done"] * 3
    table.check_integrity()
    with pytest.raises(ValueError, match="history_size"):
        LeaseTable(history_size=0)


def test_outcome_from_another_thread_never_sees_a_lease_in_between_states() -> None:
    table = LeaseTable()
    seen: dict[str, list[str]] = {f"r{i}": [] for i in range(0, 200, 7)}
    stop = threading.Event()

    def ask() -> None:
        while not stop.is_set():
            for rid, states in seen.items():
                states.append(table.outcome(rid))

    reader = threading.Thread(target=ask)
    reader.start()
    try:
        for i in range(200):
            table.start(send(f"r{i}", lease_s=1.0), now=0.0)
        wait_for(lambda: all(s and s[-1] == "held" for s in seen.values()))
        table.expire(now=2.0, early_ttl_s=1.0)
    finally:
        stop.set()
        reader.join()
    rank = {"unknown": 0, "held": 1, "expired": 2}
    for rid, states in seen.items():  # unknown, then held, then expired: never back
        assert "held" in states, "the reader never saw a live lease; the test proves nothing"
        ranks = [rank[s] for s in states]
        assert ranks == sorted(ranks), rid
        assert table.outcome(rid) == "expired"


# -- the producer's handler ------------------------------------------------------------------------
def test_handler_answers_typed_states_and_refuses_what_it_cannot_answer() -> None:
    table = LeaseTable()
    table.start(send("a"), now=0.0)
    table.renew("a", now=10.0, lease_duration_s=30.0)  # held until 40
    handle = lease_query_handler("prefill", "inst-1", lambda rid: table.status(rid, 12.5))

    def ask(query: object) -> LeaseAnswer:
        return msgspec.msgpack.decode(handle(msgspec.msgpack.encode(query)), type=LeaseAnswer)

    answer = ask(LeaseQuery(seq=7, engine_id="prefill", request_ids=["a", "b"], sent_at=3.25))
    assert answer == LeaseAnswer(
        seq=7,
        engine_id="prefill",
        instance_id="inst-1",
        states={"a": "held", "b": "unknown"},
        held_for_s={"a": MAX_PROMISE_S},  # only a held lease says how long: 27.5 s, capped
        sent_at=3.25,  # echoed: the consumer's clock, not the producer's
    )
    wrong = ask(LeaseQuery(seq=8, engine_id="other", request_ids=["a"]))
    assert wrong.states == {} and "not 'other'" in (wrong.error or "")
    many = ask(LeaseQuery(seq=9, engine_id="prefill", request_ids=["a"] * (MAX_IDS_PER_QUERY + 1)))
    assert many.states == {} and "max" in (many.error or "")
    garbage = msgspec.msgpack.decode(handle(b"\xc1junk"), type=LeaseAnswer)
    assert garbage.seq == -1 and "malformed" in (garbage.error or "")
    bad_utf8 = b"\x83\xa3seq\x01\xa9engine_id\xa2\xff\xfe\xabrequest_ids\x90"
    refused = msgspec.msgpack.decode(handle(bad_utf8), type=LeaseAnswer)
    assert "malformed lease query" in (refused.error or "")


def test_notifications_with_bad_utf8_are_a_value_error_not_a_crash() -> None:
    with pytest.raises(ValueError, match="malformed notification"):
        decode_notif(b"\x92\xa4done\x91\xa2\xff\xfe")


# -- LeaseConfirmer against a real side channel ----------------------------------------------------
class Producer:
    def __init__(self, instance: str = "inst-1", port: int = 0) -> None:
        self.table = LeaseTable()
        self.calls = 0
        self.now = 0.0  # the producer's clock

        def status(rid: str) -> LeaseStatus:
            self.calls += 1
            return self.table.status(rid, self.now)

        handler = lease_query_handler("prefill", instance, status)
        self.listener = HandshakeListener("127.0.0.1", port, b"", HASH, {LEASE_FRAME: handler})


@pytest.fixture
def producer() -> Iterator[Producer]:
    p = Producer()
    yield p
    p.listener.close()


@pytest.fixture
def confirmer() -> Iterator[LeaseConfirmer]:
    c = LeaseConfirmer(resend_s=0.5, unknown_retry_s=0.02)
    yield c
    c.close()


def settle_answers(
    c: LeaseConfirmer, clock: list[float], expect: int, tick: Callable[[], None] | None = None
) -> dict[str, Settled]:
    out: dict[str, Settled] = {}

    def poll() -> None:
        out.update(c.collect(clock[0]))
        c.send_due(clock[0])
        if tick is not None:
            tick()

    wait_for(lambda: len(out) >= expect, poll=poll)
    return out


def settle(
    c: LeaseConfirmer, clock: list[float], expect: int, tick: Callable[[], None] | None = None
) -> dict[str, Verdict]:
    return {key: a.verdict for key, a in settle_answers(c, clock, expect, tick).items()}


def test_a_held_answer_says_until_when_in_the_consumers_clock(
    producer: Producer, confirmer: LeaseConfirmer
) -> None:
    producer.table.start(send("p", lease_s=30.0), now=100.0)  # producer clock: held until 130
    endpoint = ("127.0.0.1", producer.listener.port)
    for now, until in ((104.0, 7.0 + MAX_PROMISE_S), (129.75, 7.25)):  # capped, or the lapse
        producer.now = now
        confirmer.ask(
            "d", endpoint, engine_id="prefill", instance_id="inst-1", request_id="p", now=7
        )
        answers = settle_answers(confirmer, [7.0], expect=1)  # consumer clock: sent at 7
        assert answers == {"d": Settled("held", asked_at=7.0, held_until=until)}
    assert producer.table.promised_until() == 130.0  # the furthest promise: up to the lapse
    producer.table.complete("p", now=105.0)
    confirmer.ask("e", endpoint, engine_id="prefill", instance_id="inst-1", request_id="p", now=8)
    assert settle_answers(confirmer, [8.0], expect=1) == {"e": Settled("done", 8.0, None)}


@pytest.mark.parametrize("held_for", [-1.0, float("nan"), float("inf")])
def test_a_held_answer_with_a_nonsense_duration_proves_nothing(
    confirmer: LeaseConfirmer, held_for: float
) -> None:
    def lying(payload: bytes) -> bytes:
        query = msgspec.msgpack.decode(payload, type=LeaseQuery)
        answer = LeaseAnswer(
            seq=query.seq,
            engine_id="prefill",
            instance_id="inst-1",
            states={"p": "held"},
            held_for_s={"p": held_for},
            sent_at=query.sent_at,
        )
        return msgspec.msgpack.encode(answer)

    listener = HandshakeListener("127.0.0.1", 0, b"", HASH, {LEASE_FRAME: lying})
    try:
        endpoint = ("127.0.0.1", listener.port)
        confirmer.ask(
            "d", endpoint, engine_id="prefill", instance_id="inst-1", request_id="p", now=1
        )
        assert settle_answers(confirmer, [1.0], expect=1) == {"d": Settled("held", 1.0, None)}
    finally:
        listener.close()


def test_questions_to_one_producer_go_out_as_one_query(
    producer: Producer, confirmer: LeaseConfirmer
) -> None:
    for rid in ("a", "b", "c"):
        producer.table.start(send(rid), now=0.0)
    producer.table.complete("b", now=0.0)
    producer.table.expire(now=31.0, early_ttl_s=60)  # a and c lapse
    producer.table.start(send("d"), now=31.0)
    endpoint = ("127.0.0.1", producer.listener.port)
    for key, rid in (("d-a", "a"), ("d-b", "b"), ("d-d", "d")):
        confirmer.ask(
            key, endpoint, engine_id="prefill", instance_id="inst-1", request_id=rid, now=0.0
        )
    verdicts = settle(confirmer, [0.0], expect=3)
    assert verdicts == {"d-a": "expired", "d-b": "done", "d-d": "held"}
    assert confirmer.num_queries == 1 and confirmer.num_open == 0


def test_unknown_is_asked_again_until_the_lease_starts(
    producer: Producer, confirmer: LeaseConfirmer
) -> None:
    clock = [0.0]
    endpoint = ("127.0.0.1", producer.listener.port)
    confirmer.ask("d", endpoint, engine_id="prefill", instance_id="inst-1", request_id="p", now=0)
    wait_for(
        lambda: producer.calls >= 1, poll=lambda: (confirmer.send_due(0), confirmer.collect(0))
    )

    def tick() -> None:
        clock[0] += 0.01
        if clock[0] > 0.1:
            producer.table.start(send("p"), now=clock[0])

    assert settle(confirmer, clock, expect=1, tick=tick) == {"d": "held"}
    assert confirmer.num_queries >= 2


def test_a_restarted_producer_is_told_apart_and_a_silent_one_is_asked_again(
    confirmer: LeaseConfirmer,
) -> None:
    first = Producer("inst-1")
    port = first.listener.port
    first.listener.close()  # nobody answers: the question stays open and is resent
    endpoint = ("127.0.0.1", port)
    confirmer.ask("d", endpoint, engine_id="prefill", instance_id="inst-1", request_id="p", now=0)
    confirmer.send_due(0.0)
    assert confirmer.collect(0.1) == {} and confirmer.num_open == 1
    confirmer.send_due(1.0)  # past resend_s with no answer: asked again (checked before the
    assert confirmer.num_queries >= 2  # new producer binds: ZMQ may deliver a queued query)
    second = Producer("inst-2", port=port)  # same port, new instance, knows nothing of "p"
    try:
        assert settle(confirmer, [1.0], expect=1) == {"d": "restarted"}
    finally:
        second.listener.close()


def test_cancelled_questions_are_never_settled(
    producer: Producer, confirmer: LeaseConfirmer
) -> None:
    producer.table.start(send("p"), now=0.0)
    endpoint = ("127.0.0.1", producer.listener.port)
    confirmer.ask("d1", endpoint, engine_id="prefill", instance_id="inst-1", request_id="p", now=0)
    confirmer.ask("d2", endpoint, engine_id="prefill", instance_id="inst-1", request_id="p", now=0)
    confirmer.send_due(0.0)
    confirmer.cancel("d1")
    assert settle(confirmer, [0.0], expect=1) == {"d2": "held"}
    assert confirmer.num_open == 0


def test_answers_tell_another_prompts_blocks_and_a_spent_lease_apart(
    producer: Producer, confirmer: LeaseConfirmer
) -> None:
    """The answer names the prompt the blocks hold and who said "done": a question for another
    prompt is "mismatch", one from a reader other than the one that ended the lease is
    "consumed"; an older peer that says neither is not checked. Checked against a broken build
    (``_differ`` always False): this test fails."""
    held = SendSpec(
        request_id="p", num_blocks=2, lease_duration_s=30, abort_timeout_s=60, prompt_hash="X"
    )
    producer.table.start(held, now=0.0)
    producer.table.start(msgspec.structs.replace(held, request_id="q"), now=0.0)
    producer.table.complete("q", now=1.0, kind="done", reader="reader-1")
    endpoint = ("127.0.0.1", producer.listener.port)
    asks = {  # key: (request id, prompt hash, reader)
        "same prompt": ("p", "X", "r"),
        "other prompt": ("p", "Y", "r"),
        "prompt not said": ("p", "", "r"),
        "done by me": ("q", "X", "reader-1"),
        "done by another": ("q", "X", "reader-2"),
        "other prompt, done": ("q", "Y", "reader-1"),
        "reader not said": ("q", "X", ""),
    }
    for key, (rid, prompt, reader) in asks.items():
        confirmer.ask(
            key,
            endpoint,
            engine_id="prefill",
            instance_id="inst-1",
            request_id=rid,
            now=0.0,
            prompt_hash=prompt,
            reader=reader,
        )
    assert settle(confirmer, [0.0], expect=len(asks)) == {
        "same prompt": "held",
        "other prompt": "mismatch",
        "prompt not said": "held",
        "done by me": "done",
        "done by another": "consumed",
        "other prompt, done": "mismatch",
        "reader not said": "done",
    }


def test_a_done_notification_names_its_reader_and_the_table_keeps_it_bounded() -> None:
    table = LeaseTable()
    table.complete("early", now=0.0, kind="done", reader="r" * 1000)  # before its lease starts
    table.start(send("early"), now=0.0)
    assert table.status("early", None).done_by == "r" * 64
    table.start(send("p"), now=0.0)
    table.complete("p", now=1.0, kind="release", reader="r")
    assert table.status("p", None) == LeaseStatus("released")  # only "done" names a reader
    assert decode_notif(encode_notif("done", ["p"], "r")).reader == "r"
