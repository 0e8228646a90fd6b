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
the blocks were still held when its READ ended (``status``). A lease is "held" exactly until
the worker hands its id to the engine to free, and a live lease is never freed before its
``expires_at`` unless the consumer ends it: so "held, for at least R more seconds" answered to
a question sent at consumer time ``t`` proves the blocks held until ``t + R``, and a READ seen
done before then saw the request's bytes. ``status`` is called from the side-channel thread:
every method takes the table's lock.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal, NamedTuple

from kvbridge.nixl.metadata import SendSpec

logger = logging.getLogger(__name__)

LeaseOutcome = Literal["held", "done", "released", "expired", "unknown"]
EndKind = Literal["done", "release"]
DEFAULT_HISTORY = 1 << 16
MAX_PROMISE_S = 0.5  # a "held for" answer promises at most this long (a READ that takes
# longer is confirmed after it ends); a worker that shuts down keeps its memory until then
_ENDED: dict[EndKind, LeaseOutcome] = {"done": "done", "release": "released"}


class LeaseStatus(NamedTuple):
    """A lease's outcome and, while "held", the seconds it is held at least (until its lapse,
    unless the consumer ends it first): renewals only extend it."""

    outcome: LeaseOutcome
    held_for_s: float | None = None


@dataclass
class _Lease:
    started: float
    expires_at: float
    hard_deadline: float
    num_blocks: int
    renewals: int = 0
    promised_until: float = float("-inf")  # the latest "held until" answered


class LeaseTable:
    """Runs in a producer worker; owns the leases on blocks held for remote readers."""

    def __init__(self, history_size: int = DEFAULT_HISTORY) -> None:
        if history_size < 1:
            raise ValueError(f"LeaseTable: history_size must be >= 1, got {history_size}")
        self._lock = threading.Lock()
        self._leases: dict[str, _Lease] = {}  # request id -> live lease
        self._early: dict[str, tuple[float, EndKind]] = {}  # request id -> (arrival, kind)
        self._completed: set[str] = set()  # ended by the consumer, not yet reported
        self._expired: set[str] = set()  # lapsed, not yet reported
        self._history: OrderedDict[str, LeaseOutcome] = OrderedDict()  # request id -> outcome
        self._history_size = history_size
        self.num_expired_total = 0

    def start(self, spec: SendSpec, now: float) -> None:
        with self._lock:
            rid = spec.request_id
            if rid in self._leases:
                logger.warning("lease for %s started twice; keeping the first", rid)
                return
            early = self._early.pop(rid, None)
            if early is not None:
                self._completed.add(rid)
                self._remember(rid, _ENDED[early[1]])
                return
            self._history.pop(rid, None)  # a reused request id starts afresh
            hard = now + spec.abort_timeout_s
            self._leases[rid] = _Lease(
                now, min(now + spec.lease_duration_s, hard), hard, spec.num_blocks
            )

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

    def complete(self, request_id: str, now: float, kind: EndKind = "done") -> bool:
        """The consumer is done with the blocks; False if the completion came early."""
        with self._lock:
            if self._leases.pop(request_id, None) is not None:
                self._completed.add(request_id)
                self._remember(request_id, _ENDED[kind])
                return True
            if request_id not in self._history and request_id not in self._early:
                self._early[request_id] = (now, kind)
            return False

    def expire(self, now: float, early_ttl_s: float) -> list[str]:
        """End every lapsed lease; returns their ids (newly expired this call)."""
        with self._lock:
            lapsed = [rid for rid, lease in self._leases.items() if now >= lease.expires_at]
            for rid in lapsed:
                lease = self._leases.pop(rid)
                logger.warning(
                    "lease on %d blocks of %s lapsed after %.1fs (%d renewals); freeing them",
                    lease.num_blocks,
                    rid,
                    now - lease.started,
                    lease.renewals,
                )
                self._expired.add(rid)
                self._remember(rid, "expired")
            self.num_expired_total += len(lapsed)
            for rid in [r for r, (t, _) in self._early.items() if now - t > early_ttl_s]:
                del self._early[rid]
            return lapsed

    def abandon(self, spec: SendSpec) -> None:
        """End a hold that never became readable (its host staging failed) as expired."""
        with self._lock:
            self._early.pop(spec.request_id, None)
            self._expired.add(spec.request_id)
            self._remember(spec.request_id, "expired")
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
                    return LeaseStatus("held")
                held_for = max(0.0, min(lease.expires_at - now, MAX_PROMISE_S))
                lease.promised_until = max(lease.promised_until, now + held_for)
                return LeaseStatus("held", held_for)
            ended = self._history.get(request_id)
            if ended is not None:
                return LeaseStatus(ended)
            early = self._early.get(request_id)
            return LeaseStatus("unknown" if early is None else _ENDED[early[1]])

    def _remember(self, request_id: str, outcome: LeaseOutcome) -> None:
        self._history[request_id] = outcome
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
    def num_blocks_held(self) -> int:
        with self._lock:
            return sum(lease.num_blocks for lease in self._leases.values())

    def check_integrity(self) -> None:
        with self._lock:
            live, done, lapsed = set(self._leases), self._completed, self._expired
            if live & done or live & lapsed or done & lapsed:
                raise AssertionError("LeaseTable: a request is in two states at once")
            if live & set(self._history):
                raise AssertionError("LeaseTable: a live lease also has an outcome")
            if len(self._history) > self._history_size:
                raise AssertionError("LeaseTable: history exceeds its bound")
            for rid, lease in self._leases.items():
                if not lease.started <= lease.expires_at <= lease.hard_deadline:
                    raise AssertionError(f"LeaseTable: lease of {rid} has inconsistent times")

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
            self._leases.clear()
            self._early.clear()
            self._completed.clear()
            self._expired.clear()
            self._history.clear()
            return held
