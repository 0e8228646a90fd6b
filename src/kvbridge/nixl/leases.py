"""LeaseTable: the producer's holds on finished requests' blocks, waiting for a remote reader.

A lease starts when the worker learns that the scheduler delayed a free (``SendSpec``; in
host-staged mode once the blocks are copied to the host buffer). It ends when the consumer
says ``done``/``release``, or when it lapses: no heartbeat for ``lease_duration_s``, or
``abort_timeout_s`` after it started whatever the heartbeats say::

    start ----hb----hb----hb-----------x lapse (lease_duration_s after the last beat)
    start ----hb----hb----hb----hb----hb----| hard cap (abort_timeout_s after start)

A consumer's ``done`` may overtake the ``SendSpec`` (it travels through another process);
such early completions are kept for ``abort_timeout_s`` and applied when the lease starts.

The outcome of the last ``history_size`` ended leases is kept, so a consumer can ask whether
the blocks were still held when its READ ended (``status``), with the prompt the blocks hold
and, for "done", which reader said so: a consumer holding another prompt's (or a previous
reader's, spent) ``kv_transfer_params`` learns that those blocks are not its KV.

A lease is "held" exactly until the worker hands its id to the engine to free, and a live
lease is never freed before its ``expires_at`` unless the consumer ends it: so "held, for at
least R more seconds" answered to a question sent at consumer time ``t`` proves the blocks
held until ``t + R``, and a READ seen done before then saw the request's bytes. ``status`` is
called from the side-channel thread: every method takes the table's lock.

With a ``LeaseBoard`` attached, a lease's word is on the board from its start until it ends:
written in ``start``, zeroed in the same locked section that ends it (``complete``,
``expire``, ``clear``), before its id can be handed to the engine to free.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal, NamedTuple

from kvbridge.connector.types import IntegrityError
from kvbridge.nixl.lease_board import LeaseBoard
from kvbridge.nixl.metadata import SendSpec

logger = logging.getLogger(__name__)

LeaseOutcome = Literal["held", "done", "released", "expired", "unknown"]
EndKind = Literal["done", "release"]
DEFAULT_HISTORY = 1 << 16
MAX_PROMISE_S = 0.5  # a "held for" answer promises at most this long (a READ that takes
# longer is confirmed after it ends); a worker that shuts down keeps its memory until then
_ENDED: dict[EndKind, LeaseOutcome] = {"done": "done", "release": "released"}


MAX_READER_CHARS = 64  # a reader token longer than this is cut (the history stays bounded)


class LeaseStatus(NamedTuple):
    """A lease's outcome and, while "held", the seconds it is held at least (until its lapse,
    unless the consumer ends it first): renewals only extend it. ``prompt_hash``: the prompt
    the blocks hold ("" unknown); ``done_by``: the reader whose "done" ended it ("" unknown)."""

    outcome: LeaseOutcome
    held_for_s: float | None = None
    prompt_hash: str = ""
    done_by: str = ""


class _Ended(NamedTuple):
    outcome: LeaseOutcome
    prompt_hash: str = ""
    done_by: str = ""


@dataclass
class _Lease:
    started: float
    expires_at: float
    hard_deadline: float
    num_blocks: int
    prompt_hash: str = ""
    renewals: int = 0
    promised_until: float = float("-inf")  # the latest "held until" answered


class LeaseTable:
    """Runs in a producer worker; owns the leases on blocks held for remote readers."""

    def __init__(self, history_size: int = DEFAULT_HISTORY) -> None:
        if history_size < 1:
            raise ValueError(f"LeaseTable: history_size must be >= 1, got {history_size}")
        self._lock = threading.Lock()
        self._leases: dict[str, _Lease] = {}  # request id -> live lease
        # request id -> (arrival, kind, reader)
        self._early: dict[str, tuple[float, EndKind, str]] = {}
        self._completed: set[str] = set()  # ended by the consumer, not yet reported
        self._expired: set[str] = set()  # lapsed, not yet reported
        self._history: OrderedDict[str, _Ended] = OrderedDict()  # request id -> how it ended
        self._history_size = history_size
        self.num_expired_total = 0
        self.board: LeaseBoard | None = None  # set once the worker registered one

    def attach_board(self, board: LeaseBoard) -> None:
        """Publish every lease started from now on on ``board``."""
        with self._lock:
            if self._leases:
                raise RuntimeError("LeaseTable: attach the board before any lease starts")
            self.board = board

    def start(self, spec: SendSpec, now: float) -> None:
        with self._lock:
            rid = spec.request_id
            if rid in self._leases:
                logger.warning("lease for %s started twice; keeping the first", rid)
                return
            early = self._early.pop(rid, None)
            if early is not None:
                self._completed.add(rid)
                self._remember(rid, _Ended(_ENDED[early[1]], spec.prompt_hash, early[2]))
                return
            self._history.pop(rid, None)  # a reused request id starts afresh
            hard = now + spec.abort_timeout_s
            self._leases[rid] = _Lease(
                now,
                min(now + spec.lease_duration_s, hard),
                hard,
                spec.num_blocks,
                spec.prompt_hash,
            )
            if self.board is not None:
                self.board.post(rid, spec.prompt_hash, spec.block_ids)

    def renew(self, request_id: str, now: float, lease_duration_s: float) -> bool:
        """Extend a live lease (never past its hard cap); False if there is none."""
        with self._lock:
            lease = self._leases.get(request_id)
            if lease is None:
                return False
            lease.expires_at = min(
                max(lease.expires_at, now + lease_duration_s), lease.hard_deadline
            )
            lease.renewals += 1
            return True

    def complete(
        self, request_id: str, now: float, kind: EndKind = "done", reader: str = ""
    ) -> bool:
        """The consumer (``reader``, if it said) is done with the blocks; False if the
        completion came early."""
        reader = reader[:MAX_READER_CHARS] if kind == "done" else ""
        with self._lock:
            lease = self._leases.pop(request_id, None)
            if lease is not None:
                self._unpost(request_id)
                self._completed.add(request_id)
                self._remember(request_id, _Ended(_ENDED[kind], lease.prompt_hash, reader))
                return True
            if request_id not in self._history and request_id not in self._early:
                self._early[request_id] = (now, kind, reader)
            return False

    def expire(self, now: float, early_ttl_s: float) -> list[str]:
        """End every lapsed lease; returns their ids (newly expired this call)."""
        with self._lock:
            lapsed = [rid for rid, lease in self._leases.items() if now >= lease.expires_at]
            for rid in lapsed:
                lease = self._leases.pop(rid)
                self._unpost(rid)
                logger.warning(
                    "lease on %d blocks of %s lapsed after %.1fs (%d renewals); freeing them",
                    lease.num_blocks,
                    rid,
                    now - lease.started,
                    lease.renewals,
                )
                self._expired.add(rid)
                self._remember(rid, _Ended("expired", lease.prompt_hash))
            self.num_expired_total += len(lapsed)
            for rid in [r for r, (t, _, _) in self._early.items() if now - t > early_ttl_s]:
                del self._early[rid]
            return lapsed

    def abandon(self, spec: SendSpec) -> None:
        """End a hold that never became readable (its host staging failed) as expired."""
        with self._lock:
            self._early.pop(spec.request_id, None)
            self._expired.add(spec.request_id)
            self._remember(spec.request_id, _Ended("expired", spec.prompt_hash))
            self.num_expired_total += 1

    def take_finished(self, allowed: set[str]) -> set[str]:
        """Ended leases among ``allowed``; they are forgotten once returned."""
        with self._lock:
            done = (self._completed | self._expired) & allowed
            self._completed -= done
            self._expired -= done
            return done

    def outcome(self, request_id: str) -> LeaseOutcome:
        """What became of the lease on ``request_id``; safe to call from any thread."""
        return self.status(request_id, None).outcome

    def status(self, request_id: str, now: float | None) -> LeaseStatus:
        """``outcome`` plus, for a held lease and a ``now``, how long it stays held at least:
        until it lapses (``expire`` ends it no earlier), at most ``MAX_PROMISE_S``, a promise
        kept until then even through ``clear`` (see ``promised_until``). Safe from any thread."""
        with self._lock:
            lease = self._leases.get(request_id)
            if lease is not None:
                if now is None:
                    return LeaseStatus("held", prompt_hash=lease.prompt_hash)
                held_for = max(0.0, min(lease.expires_at - now, MAX_PROMISE_S))
                lease.promised_until = max(lease.promised_until, now + held_for)
                return LeaseStatus("held", held_for, lease.prompt_hash)
            ended = self._history.get(request_id)
            if ended is not None:
                return LeaseStatus(ended.outcome, None, ended.prompt_hash, ended.done_by)
            early = self._early.get(request_id)
            if early is None:
                return LeaseStatus("unknown")
            return LeaseStatus(_ENDED[early[1]], done_by=early[2])

    def _unpost(self, request_id: str) -> None:
        """Zero an ending lease's board word (the lock is held)."""
        if self.board is not None:
            self.board.release(request_id)

    def _remember(self, request_id: str, ended: _Ended) -> None:
        self._history[request_id] = ended
        self._history.move_to_end(request_id)
        while len(self._history) > self._history_size:
            self._history.popitem(last=False)

    def is_live(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._leases

    def knows(self, request_id: str) -> bool:
        with self._lock:
            return (
                request_id in self._leases
                or request_id in self._completed
                or request_id in self._expired
            )

    @property
    def num_live(self) -> int:
        return len(self._leases)

    @property
    def busy(self) -> bool:
        """A lease is live, ended and unreported, or a completion came early (else ``expire``
        and ``take_finished`` have nothing to do)."""
        return bool(self._leases or self._completed or self._expired or self._early)

    @property
    def num_blocks_held(self) -> int:
        with self._lock:
            return sum(lease.num_blocks for lease in self._leases.values())

    def check_integrity(self) -> None:
        with self._lock:
            live, done, lapsed = set(self._leases), self._completed, self._expired
            if live & done or live & lapsed or done & lapsed:
                raise IntegrityError("LeaseTable: a request is in two states at once")
            if live & set(self._history):
                raise IntegrityError("LeaseTable: a live lease also has an outcome")
            if len(self._history) > self._history_size:
                raise IntegrityError("LeaseTable: history exceeds its bound")
            for rid, lease in self._leases.items():
                if not lease.started <= lease.expires_at <= lease.hard_deadline:
                    raise IntegrityError(f"LeaseTable: lease of {rid} has inconsistent times")
            if self.board is not None:
                self.board.check_integrity(live)

    def promised_until(self) -> float:
        """Until when answers promised live leases held (-inf if none): whoever drops them
        (``clear``) must keep their memory untouched until then."""
        with self._lock:
            return max(
                (lease.promised_until for lease in self._leases.values()), default=float("-inf")
            )

    def clear(self) -> set[str]:
        """Drop everything (shutdown); returns the ids that were still held."""
        with self._lock:
            held = set(self._leases)
            if self.board is not None:
                self.board.clear()
            self._leases.clear()
            self._early.clear()
            self._completed.clear()
            self._expired.clear()
            self._history.clear()
            return held
