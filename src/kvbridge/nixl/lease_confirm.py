"""Lease confirmation: a consumer asks a producer's side channel what became of leases.

A READ that completes tells the consumer nothing about whether the producer still held the
blocks while it ran (a lapsed lease frees them for reuse). So the consumer asks, while the
READ runs (or, when the producer stages through host memory, before posting it)::

    consumer DEALER  --[b"", b"lease", LeaseQuery(seq, sent_at, engine_id, request_ids)]-->
    consumer DEALER  <--[b"", LeaseAnswer(seq, sent_at, instance_id, states, held_for_s)]--

"held, for at least R more seconds" to a query sent at consumer time ``sent_at`` proves the
blocks held until ``sent_at + R`` (the producer answered after ``sent_at``, and a live lease
ends no earlier than its lapse unless this consumer ends it), so a READ seen done before then
needs no further question; otherwise the consumer asks again after the READ.

The producer's side-channel thread answers from its ``LeaseTable`` (locked), so a worker that
is slow to step does not delay the answer. Queries are batched per producer, resent when
unanswered, and repeated while the answer is "unknown" (the lease may not have started yet);
the caller bounds the wait. An answer from another producer instance (it restarted) settles a
question as "restarted"; one naming another prompt than the question's as "mismatch" (the
params were another request's); a "done" said by another reader as "consumed" (the params
were spent: the blocks may hold another prompt by now).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import msgspec
import zmq

from kvbridge.nixl.leases import LeaseOutcome, LeaseStatus
from kvbridge.nixl.zmq_links import tcp_endpoint

logger = logging.getLogger(__name__)

LEASE_FRAME = b"lease"
MAX_IDS_PER_QUERY = 256  # keeps a query well under the side channel's 64 KiB request limit
MAX_ANSWER_BYTES = 1 << 20
Verdict = Literal[
    "held", "done", "released", "expired", "restarted", "refused", "mismatch", "consumed"
]
# verdicts that say the blocks are not the asker's KV (it must never end that lease) -> why
NOT_OURS: dict[Verdict, str] = {
    "mismatch": "hold another prompt: these kv_transfer_params are another request's",
    "consumed": "were read by another load already: these kv_transfer_params were spent",
}


class LeaseQuery(msgspec.Struct, frozen=True, kw_only=True):
    """Consumer -> producer: were these requests' leases held when the READs ended?"""

    seq: int
    engine_id: str  # the producer engine the consumer means
    request_ids: list[str]
    sent_at: float = 0.0  # the consumer's clock when it sent the query; echoed in the answer


class LeaseAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """Producer's lease outcome per request id, with its instance id."""

    seq: int
    engine_id: str
    instance_id: str  # the producer worker's agent name: changes when it restarts
    states: dict[str, LeaseOutcome] = msgspec.field(default_factory=dict)
    held_for_s: dict[str, float] = msgspec.field(default_factory=dict)  # "held": at least so long
    sent_at: float = 0.0  # the query's
    error: str | None = None
    prompt_hashes: dict[str, str] = msgspec.field(default_factory=dict)  # the blocks' prompt
    done_by: dict[str, str] = msgspec.field(default_factory=dict)  # "done": whose


_ANSWER_DECODER = msgspec.msgpack.Decoder(LeaseAnswer)
_QUERY_DECODER = msgspec.msgpack.Decoder(LeaseQuery)


def lease_query_handler(
    engine_id: str, instance_id: str, status: Callable[[str], LeaseStatus]
) -> Callable[[bytes], bytes]:
    """The producer's answer to a ``LeaseQuery`` payload; never raises."""

    def answer(payload: bytes) -> bytes:
        try:
            query = _QUERY_DECODER.decode(payload)
        except (msgspec.DecodeError, UnicodeDecodeError) as e:  # msgspec lets bad UTF-8 through
            return encode(seq=-1, error=f"malformed lease query: {e}")
        if query.engine_id != engine_id:
            return encode(
                seq=query.seq, error=f"this is engine {engine_id!r}, not {query.engine_id!r}"
            )
        if len(query.request_ids) > MAX_IDS_PER_QUERY:
            n = len(query.request_ids)
            return encode(
                seq=query.seq, error=f"{n} request ids in one query (max {MAX_IDS_PER_QUERY})"
            )
        states = {rid: status(rid) for rid in query.request_ids}
        answer = LeaseAnswer(
            seq=query.seq,
            engine_id=engine_id,
            instance_id=instance_id,
            sent_at=query.sent_at,
            states={rid: s.outcome for rid, s in states.items()},
            held_for_s={rid: s.held_for_s for rid, s in states.items() if s.held_for_s is not None},
            prompt_hashes={rid: s.prompt_hash for rid, s in states.items() if s.prompt_hash},
            done_by={rid: s.done_by for rid, s in states.items() if s.done_by},
        )
        return msgspec.msgpack.encode(answer)

    def encode(*, seq: int, error: str) -> bytes:
        answer = LeaseAnswer(seq=seq, engine_id=engine_id, instance_id=instance_id, error=error)
        return msgspec.msgpack.encode(answer)

    return answer


Endpoint = tuple[str, int]


class Settled(NamedTuple):
    """A question's answer: the verdict, when the answered query was sent (consumer clock), and
    for "held" until when the blocks are held at least (None when the producer did not say)."""

    verdict: Verdict
    asked_at: float
    held_until: float | None = None


@dataclass
class _Question:
    endpoint: Endpoint
    engine_id: str
    instance_id: str  # the producer instance whose blocks were (or will be) read
    request_id: str  # the producer's request id
    first_seq: int  # answers to older queries do not count
    next_send: float
    prompt_hash: str = ""  # the prompt the consumer reads for ("": do not check)
    reader: str = ""  # the consumer load's token, as in its "done" ("": do not check)


class LeaseConfirmer:
    """Runs in a consumer worker; owns its sockets to producers' side channels and open questions.

    ``ask`` opens a question (keyed by the consumer's request id), ``send_due`` sends the due
    ones (one query per producer), ``collect`` returns the questions settled since. A producer's
    socket lives while a question to it is open: ``collect`` and ``cancel`` close the others (a
    consumer outlives many producers; each kept socket held a descriptor, memory, and
    reconnected to its exited producer forever). Not thread-safe: the worker thread alone
    calls it.
    """

    def __init__(self, *, resend_s: float = 0.5, unknown_retry_s: float = 0.02) -> None:
        self._resend_s = resend_s
        self._unknown_retry_s = unknown_retry_s
        self._ctx = zmq.Context()
        self._socks: dict[Endpoint, zmq.Socket[bytes]] = {}
        self._questions: dict[str, _Question] = {}  # consumer request id -> open question
        self._seq = 0
        self._closed = False
        self.num_queries = 0

    def ask(
        self,
        key: str,
        endpoint: Endpoint,
        *,
        engine_id: str,
        instance_id: str,
        request_id: str,
        now: float,
        prompt_hash: str = "",
        reader: str = "",
    ) -> None:
        self._questions[key] = _Question(
            endpoint, engine_id, instance_id, request_id, self._seq + 1, now, prompt_hash, reader
        )

    def cancel(self, key: str) -> None:
        self._questions.pop(key, None)
        self._close_unasked()

    def is_open(self, key: str) -> bool:
        return key in self._questions

    @property
    def num_open(self) -> int:
        return len(self._questions)

    def send_due(self, now: float) -> None:
        """Send one query per producer for the questions due now; ``now`` must not be later
        than the clock's reading at the send (it bounds how long a "held" answer holds)."""
        due: dict[tuple[Endpoint, str], list[_Question]] = {}
        for q in self._questions.values():
            if now >= q.next_send:
                due.setdefault((q.endpoint, q.engine_id), []).append(q)
        for (endpoint, engine_id), questions in due.items():
            for i in range(0, len(questions), MAX_IDS_PER_QUERY):
                batch = questions[i : i + MAX_IDS_PER_QUERY]
                self._seq += 1
                query = LeaseQuery(
                    seq=self._seq,
                    engine_id=engine_id,
                    request_ids=[q.request_id for q in batch],
                    sent_at=now,
                )
                self._send(endpoint, msgspec.msgpack.encode(query))
                for q in batch:
                    q.next_send = now + self._resend_s

    def collect(self, now: float) -> dict[str, Settled]:
        """Settled questions (consumer request id -> answer); they are closed."""
        settled: dict[str, Settled] = {}
        for endpoint, sock in list(self._socks.items()):
            while sock.poll(0):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                answer = _decode(frames, endpoint)
                if answer is not None:
                    self._apply(endpoint, answer, now, settled)
        for key in settled:
            del self._questions[key]
        self._close_unasked()
        return settled

    @property
    def num_sockets(self) -> int:
        return len(self._socks)

    def _close_unasked(self) -> None:
        """Close the sockets of producers no open question is for."""
        asked = {q.endpoint for q in self._questions.values()}
        for endpoint in [e for e in self._socks if e not in asked]:
            self._socks.pop(endpoint).close()

    def _apply(
        self, endpoint: Endpoint, answer: LeaseAnswer, now: float, settled: dict[str, Settled]
    ) -> None:
        for key, q in self._questions.items():
            if q.endpoint != endpoint or answer.seq < q.first_seq or key in settled:
                continue
            if answer.error is not None:
                logger.warning("lease query to %s:%d refused: %s", *endpoint, answer.error)
                if q.engine_id != answer.engine_id:
                    settled[key] = Settled("refused", answer.sent_at)
                continue
            state = answer.states.get(q.request_id)
            if state is None:
                continue
            if answer.instance_id != q.instance_id:
                settled[key] = Settled("restarted", answer.sent_at)
            elif _differ(q.prompt_hash, answer.prompt_hashes.get(q.request_id, "")):
                settled[key] = Settled("mismatch", answer.sent_at)
            elif state == "done" and _differ(q.reader, answer.done_by.get(q.request_id, "")):
                settled[key] = Settled("consumed", answer.sent_at)
            elif state == "unknown":
                q.next_send = min(q.next_send, now + self._unknown_retry_s)
            else:
                held_for = answer.held_for_s.get(q.request_id, -1.0) if state == "held" else -1.0
                ok = math.isfinite(held_for) and held_for >= 0
                until = answer.sent_at + held_for if ok else None
                settled[key] = Settled(state, answer.sent_at, until)

    def _send(self, endpoint: Endpoint, payload: bytes) -> None:
        sock = self._socks.get(endpoint)
        if sock is None:
            host, port = endpoint
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_ANSWER_BYTES)
            if ":" in host:
                sock.setsockopt(zmq.IPV6, 1)
            sock.connect(tcp_endpoint(host, port))
            self._socks[endpoint] = sock
        try:
            sock.send_multipart([b"", LEASE_FRAME, payload], zmq.NOBLOCK)
            self.num_queries += 1
        except zmq.Again:
            logger.debug("lease query to %s:%d not queued (peer busy); will resend", *endpoint)

    def close(self) -> None:
        """Close the sockets and forget open questions; idempotent."""
        if self._closed:
            return
        self._closed = True
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()
        self._questions.clear()
        self._ctx.term()


def _differ(ours: str, theirs: str) -> bool:
    """Both sides said, and not the same (an older peer says nothing: no check)."""
    return bool(ours and theirs and ours != theirs)


def _decode(frames: list[bytes], endpoint: Endpoint) -> LeaseAnswer | None:
    body = frames[1:] if frames[:1] == [b""] else frames
    if len(body) != 1:
        logger.warning("lease answer from %s:%d has %d frames; dropped", *endpoint, len(body))
        return None
    try:
        return _ANSWER_DECODER.decode(body[0])
    except (msgspec.DecodeError, UnicodeDecodeError) as e:  # msgspec lets bad UTF-8 through
        logger.warning("malformed lease answer from %s:%d dropped: %s", *endpoint, e)
        return None
