"""LeaseTable: the producer's holds on finished requests' blocks, waiting for a remote reader.

A lease starts when the worker learns that the scheduler delayed a free (``SendSpec``). It
ends when the consumer says ``done``/``release``, or when it lapses: no heartbeat for
``lease_duration_s``, or ``abort_timeout_s`` after it started whatever the heartbeats say::

    start ----hb----hb----hb-----------x lapse (lease_duration_s after the last beat)
    start ----hb----hb----hb----hb----hb----| hard cap (abort_timeout_s after start)

A consumer's ``done`` may overtake the ``SendSpec`` (it travels through another process);
such early completions are kept for ``abort_timeout_s`` and applied when the lease starts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kvbridge.nixl.metadata import SendSpec

logger = logging.getLogger(__name__)


@dataclass
class _Lease:
    started: float
    expires_at: float
    hard_deadline: float
    num_blocks: int
    renewals: int = 0


class LeaseTable:
    """Runs in a producer worker; owns the leases on blocks held for remote readers."""

    def __init__(self) -> None:
        self._leases: dict[str, _Lease] = {}  # request id -> live lease
        self._early: dict[str, float] = {}  # request id -> when its completion arrived
        self._completed: set[str] = set()  # ended by the consumer, not yet reported
        self._expired: set[str] = set()  # lapsed, not yet reported
        self.num_expired_total = 0

    def start(self, spec: SendSpec, now: float) -> None:
        if spec.request_id in self._leases:
            logger.warning("lease for %s started twice; keeping the first", spec.request_id)
            return
        if self._early.pop(spec.request_id, None) is not None:
            self._completed.add(spec.request_id)
            return
        hard = now + spec.abort_timeout_s
        self._leases[spec.request_id] = _Lease(
            now, min(now + spec.lease_duration_s, hard), hard, spec.num_blocks
        )

    def renew(self, request_id: str, now: float, lease_duration_s: float) -> bool:
        """Extend a live lease (never past its hard cap); False if there is none."""
        lease = self._leases.get(request_id)
        if lease is None:
            return False
        lease.expires_at = min(max(lease.expires_at, now + lease_duration_s), lease.hard_deadline)
        lease.renewals += 1
        return True

    def complete(self, request_id: str, now: float) -> bool:
        """The consumer is done with the blocks; False if the completion came early."""
        if self._leases.pop(request_id, None) is not None:
            self._completed.add(request_id)
            return True
        if request_id not in self._completed and request_id not in self._expired:
            self._early[request_id] = now
        return False

    def expire(self, now: float, early_ttl_s: float) -> list[str]:
        """End every lapsed lease; returns their ids (newly expired this call)."""
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
        self.num_expired_total += len(lapsed)
        for rid in [r for r, t in self._early.items() if now - t > early_ttl_s]:
            del self._early[rid]
        return lapsed

    def take_finished(self, allowed: set[str]) -> set[str]:
        """Ended leases among ``allowed``; they are forgotten once returned."""
        done = (self._completed | self._expired) & allowed
        self._completed -= done
        self._expired -= done
        return done

    def is_live(self, request_id: str) -> bool:
        return request_id in self._leases

    def knows(self, request_id: str) -> bool:
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
        return sum(lease.num_blocks for lease in self._leases.values())

    def check_integrity(self) -> None:
        live, done, lapsed = set(self._leases), self._completed, self._expired
        if live & done or live & lapsed or done & lapsed:
            raise AssertionError("LeaseTable: a request is in two states at once")
        for rid, lease in self._leases.items():
            if not lease.started <= lease.expires_at <= lease.hard_deadline:
                raise AssertionError(f"LeaseTable: lease of {rid} has inconsistent times")

    def clear(self) -> set[str]:
        """Drop everything (shutdown); returns the ids that were still held."""
        held = set(self._leases)
        self._leases.clear()
        self._early.clear()
        self._completed.clear()
        self._expired.clear()
        return held
