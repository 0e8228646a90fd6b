"""LoadBook: a consumer's loads in flight, and how each one ends (``KVReader`` builds on it).

Ending a load releases what it holds, in this order: its READ's transfer handle, its board
READ's (the producer owes nothing more to a load nothing reads for: it says "done"), its
binding of the remote engine, its lease question; then it is reported (a failed one with its
reason and load-error blocks). A handle whose release fails keeps the remote bound until a
retry succeeds (``ReadXfers``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from kvbridge.connector.stats import KVConnectorStats
from kvbridge.connector.types import IntegrityError
from kvbridge.nixl.board_reads import BoardReads
from kvbridge.nixl.lease_confirm import LeaseConfirmer
from kvbridge.nixl.load_results import LoadResults
from kvbridge.nixl.load_state import Load, ReaderConfig
from kvbridge.nixl.read_xfers import ReadXfers
from kvbridge.nixl.remotes import RemoteEngines
from kvbridge.nixl.staging import HostStaging
from kvbridge.nixl.transfers import KVRegions
from kvbridge.nixl.transport import DlistHandle, NixlTransport

logger = logging.getLogger(__name__)


class LoadBook:
    """Runs in a consumer worker; owns the in-flight loads and what each holds until it ends."""

    def __init__(
        self,
        transport: NixlTransport,
        local: KVRegions,
        local_dlist: DlistHandle,
        group_layers: list[list[int]],
        engines: RemoteEngines,
        config: ReaderConfig,
        stats: KVConnectorStats,
        confirmer: LeaseConfirmer,
        staging: HostStaging | None = None,
        clock: Callable[[], float] = time.monotonic,
        boards: BoardReads | None = None,
    ) -> None:
        self._t = transport
        self._clock = clock  # the clock of the ``now`` passed to ``add`` and ``poll``
        self._local = local  # the host buffer's blocks when ``staging``
        self._xfers = ReadXfers(transport, local_dlist)
        self._group_layers = group_layers
        self.engines = engines
        self._cfg = config
        self._stats = stats
        self.confirmer = confirmer
        self._staging = staging
        self.boards = boards  # None: no board READs (every READ waits for the lease answer)
        self._recvs: dict[str, Load] = {}  # request id -> load in progress
        self.results = LoadResults()

    # -- endings --------------------------------------------------------------------------------
    def _fail(self, recv: Load, reason: str) -> None:
        """End a failed load; one whose READ cannot be cancelled yet drains instead (retried
        by ``retry_drain``): until the READ is cancelled, P is not told "release" (it could
        reuse the blocks the READ copies) and the engine is not given the blocks back (it
        would recompute into blocks the READ may still write)."""
        if recv.phase in ("connect", "gate", "read", "drain"):  # after a READ, "done" goes out
            if not self._cancel_read(recv):
                if recv.phase != "drain":
                    logger.error(
                        "load of %s failed (%s) but its READ could not be cancelled; holding "
                        "its blocks until it is",
                        recv.spec.request_id,
                        reason,
                    )
                    self.confirmer.cancel(recv.spec.request_id)
                recv.phase, recv.drain_reason = "drain", reason
                return
            self._notify_release(recv)
        if not recv.aborted:
            self.results.failed(recv.spec, reason)
        self._end(recv)

    def retry_drain(self, recv: Load) -> None:
        """Try again to cancel a draining load's READ; the load ends once that worked."""
        self._fail(recv, recv.drain_reason)

    def _cancel_read(self, recv: Load) -> bool:
        """Cancel the load's READ (release its handle); False while that fails."""
        if recv.handle is not None and not self._xfers.cancel(recv.handle):
            return False
        recv.handle = None
        return True

    def _notify_release(self, recv: Load) -> None:
        if not recv.foreign:
            spec = recv.spec
            self.engines.notify(spec.remote_engine_id, "release", [spec.remote_request_id])

    def _notify_done(self, recv: Load) -> None:
        if not recv.foreign:  # another prompt's (or spent) blocks: not this load's to end
            spec = recv.spec
            self.engines.notify(
                spec.remote_engine_id, "done", [spec.remote_request_id], reader=recv.reader
            )

    def _end(self, recv: Load) -> None:
        """Release what the load holds and report it (as aborted or as received)."""
        self._release_transfer(recv)
        self._end_board(recv)
        self._unbind(recv)
        self.confirmer.cancel(recv.spec.request_id)
        self._recvs.pop(recv.spec.request_id, None)
        if not recv.aborted or recv.report:
            self.results.ended(recv.spec.request_id)

    def _end_board(self, recv: Load) -> None:
        """Stop the load's board READ, if one runs: its READ is over, so say "done"."""
        if recv.board is not None:
            self._drop_board(recv)
            self._unbind(recv)
            self._notify_done(recv)

    def _drop_board(self, recv: Load) -> None:
        """Release the board READ's handle (cancelling it if in flight) and its window."""
        check, recv.board = recv.board, None
        if check is None or self.boards is None:
            return
        boards, window = self.boards, check.window
        released = self._xfers.release(check.handle, recv.remote, lambda: boards.recover(window))
        boards.give_back(window, released=released)
        if not released:
            recv.remote = None  # the unreleased handle keeps the remote bound

    def _unbind(self, recv: Load) -> None:
        if recv.remote is not None:
            self.engines.unbind(recv.remote)
            recv.remote = None

    def _release_transfer(self, recv: Load) -> None:
        handle, recv.handle = recv.handle, None
        if handle is not None and not self._xfers.release(handle, recv.remote):
            recv.remote = None  # the unreleased handle keeps the remote bound

    # -- introspection and shutdown --------------------------------------------------------------
    @property
    def num_inflight(self) -> int:
        return len(self._recvs)

    def check_integrity(self) -> None:
        for remote in self.engines:
            users = sum(1 for r in self._recvs.values() if r.remote is remote)
            users += self._xfers.bound(remote)
            if users != remote.inflight:
                raise IntegrityError(
                    f"KVReader: engine {remote.engine_id} counts {remote.inflight} users, "
                    f"{users} hold it"
                )
        asking = {rid for rid, r in self._recvs.items() if r.phase in ("gate", "read", "confirm")}
        if self.confirmer.num_open > len(asking):
            raise IntegrityError("KVReader: lease questions open for loads that ended")
        if self.boards is not None:
            self.boards.check_integrity(sum(1 for r in self._recvs.values() if r.board))

    def close(self) -> None:
        """Release every handle, dlist and remote agent; idempotent."""
        for recv in list(self._recvs.values()):
            if recv.landing is not None:
                try:
                    recv.landing.wait()
                except Exception as e:  # shutting down: nothing left to recover
                    logger.error("a landing copy of %s failed: %s", recv.spec.request_id, e)
            recv.aborted = True
            self._end(recv)
        for remote in self._xfers.retry_zombies():
            self.engines.unbind(remote)
        self.confirmer.close()
        self.engines.close()
        if self.boards is not None:
            self.boards.close()
        self.results.clear()
