"""LeaseKeeper: the producer side of a worker step: holds, host staging, consumer notifications.

A ``SendSpec`` starts a lease at once, or in host-staged mode once its blocks are in the host
buffer (one batched copy per step; the lease, and with it "held" for consumers, starts when
that copy is done). Notifications renew or end leases; lapsed leases expire; ended ones are
reported in ``finished_sending`` once the scheduler said the request finished.
"""

from __future__ import annotations

import logging

from kvbridge.connector.stats import KVConnectorStats
from kvbridge.copy.backend import CopyHandle
from kvbridge.nixl import stats as keys
from kvbridge.nixl.leases import LeaseTable
from kvbridge.nixl.metadata import SendSpec, decode_notif
from kvbridge.nixl.staging import HostStaging
from kvbridge.nixl.transport import NixlTransport, NixlTransportError

logger = logging.getLogger(__name__)


class LeaseKeeper:
    """Runs in a producer worker; owns the step logic around its ``LeaseTable``."""

    def __init__(
        self,
        leases: LeaseTable,
        stats: KVConnectorStats,
        *,
        lease_duration_s: float,
        abort_timeout_s: float,
    ) -> None:
        self.leases = leases
        self._stats = stats
        self._lease_s = lease_duration_s
        self._abort_s = abort_timeout_s
        self.staging: HostStaging | None = None
        self._staging_out: list[tuple[CopyHandle, list[SendSpec]]] = []  # copies in flight
        self._sched_finished: set[str] = set()  # finished per the scheduler, not yet reported

    def start(self, sends: list[SendSpec], now: float) -> None:
        """Hold the blocks of ``sends``: leases now, or after staging them to host memory."""
        if self.staging is None or not sends:
            self._start_leases(sends, now)
            return
        ok = [s for s in sends if sum(len(g) for g in s.block_ids) == s.num_blocks]
        for send in sends:
            if send not in ok:
                logger.error("hold of %s names no block ids; cannot stage it", send.request_id)
                self.leases.abandon(send)
        if not ok:
            return
        groups = max(len(s.block_ids) for s in ok)
        ids: list[list[int]] = [[] for _ in range(groups)]
        for send in ok:
            for group, blocks in enumerate(send.block_ids):
                ids[group].extend(blocks)
        try:
            handle = self.staging.stage_out(ids)
        except Exception:
            logger.exception("staging %d held requests to host memory failed", len(ok))
            for send in ok:
                self.leases.abandon(send)
            return
        self._staging_out.append((handle, ok))
        self.poll(now)

    def poll(self, now: float) -> None:
        """Start the leases whose host staging finished."""
        pending, self._staging_out = self._staging_out, []
        for handle, sends in pending:
            try:
                done = handle.done()
            except Exception:
                logger.exception("staging to host memory failed; dropping %d holds", len(sends))
                for send in sends:
                    self.leases.abandon(send)
                continue
            if not done:
                self._staging_out.append((handle, sends))
                continue
            self._start_leases(sends, now)

    def _start_leases(self, sends: list[SendSpec], now: float) -> None:
        board = self.leases.board
        full = 0 if board is None else board.num_full
        for send in sends:
            self.leases.start(send, now)
        if board is not None and board.num_full > full:  # those consumers will ask only
            self._stats.incr(keys.BOARD_FULL, board.num_full - full)

    def drain_notifs(self, transport: NixlTransport, now: float) -> None:
        try:
            notifs = transport.get_new_notifs()
        except NixlTransportError as e:
            logger.warning("reading NIXL notifications failed: %s", e)
            return
        for agent, messages in notifs.items():
            for payload in messages:
                try:
                    notif = decode_notif(payload)
                except ValueError as e:
                    self._stats.incr(keys.FAILED_NOTIFICATIONS)
                    logger.warning("notification from %s dropped: %s", agent, e)
                    continue
                self._stats.incr(keys.NOTIFICATIONS_RECEIVED)
                for rid in notif.request_ids:
                    if notif.kind == "heartbeat":
                        self.leases.renew(rid, now, self._lease_s)
                    else:
                        self.leases.complete(rid, now, notif.kind, notif.reader)

    def finished(self, finished_req_ids: frozenset[str], now: float) -> set[str]:
        """Expire lapsed leases; the ended ones the scheduler said finished (a SendSpec and its
        finish come in one step)."""
        if not (self._staging_out or self._sched_finished or self.leases.busy):
            return set()  # nothing held, ended or early: a consumer's every step
        self.poll(now)
        expired = self.leases.expire(now, early_ttl_s=self._abort_s)
        if expired:
            self._stats.incr(keys.EXPIRED_REQS, len(expired))
        allowed = self._sched_finished | finished_req_ids
        sending = self.leases.take_finished(allowed)
        staging = {s.request_id for _, sends in self._staging_out for s in sends}
        self._sched_finished = {
            r for r in allowed - sending if r in staging or self.leases.knows(r)
        }
        return sending

    @property
    def num_staging(self) -> int:
        return sum(len(sends) for _, sends in self._staging_out)

    def close(self) -> set[str]:
        """Wait for staging copies and drop every hold; returns the ids still held."""
        for handle, _ in self._staging_out:
            try:
                handle.wait()
            except Exception as e:  # shutting down: nothing left to recover
                logger.error("a staging copy failed at shutdown: %s", e)
        self._staging_out.clear()
        self._sched_finished.clear()
        return self.leases.clear()
