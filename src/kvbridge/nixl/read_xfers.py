"""ReadXfers: posting planned READs, polling them, and releasing their handles on every path."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import NamedTuple

from kvbridge.nixl.remotes import TRANSPORT_ERRORS, RemoteEngine
from kvbridge.nixl.transfers import ReadPlan
from kvbridge.nixl.transport import (
    DlistHandle,
    Indices,
    NixlTransport,
    NixlTransportError,
    XferHandle,
    XferState,
)

logger = logging.getLogger(__name__)


class PostedRead(NamedTuple):
    """A posted READ: its transfer handle and first state."""

    handle: XferHandle
    state: XferState  # what ``transfer`` answered
    posted_wall: float  # perf_counter() just before ``transfer``
    post_s: float = 0.0  # how long ``transfer`` took (a READ "DONE" in it ran inside it)


class ReadXfers:
    """Runs in a consumer worker; owns READ handles whose release failed, until it succeeds.

    Such a READ may still be in flight: it keeps its remote engine bound (not detached) until
    its handle is released.
    """

    def __init__(self, transport: NixlTransport, local_dlist: DlistHandle):
        self._t = transport
        self._local_dlist = local_dlist
        # handles whose release failed, retried; with the remote engine each keeps bound and
        # what to do once it is released
        self._zombies: list[tuple[XferHandle, RemoteEngine | None, Callable[[], None] | None]] = []
        self._refused: set[XferHandle] = set()  # handles whose release failed (logged once)

    def post(self, plan: ReadPlan, remote: RemoteEngine, notif: bytes = b"") -> PostedRead:
        """Make and post one READ over the dlists prepared once (no per-READ dlist: preparing
        and releasing VRAM dlists costs milliseconds); raises ``TRANSPORT_ERRORS`` having
        released what it made."""
        return self.post_indices(
            self._local_dlist, plan.local_indices, remote.dlist, plan.remote_indices, notif
        )

    def post_indices(
        self,
        local_dlist: DlistHandle,
        local_indices: Indices,
        remote_dlist: DlistHandle,
        remote_indices: Indices,
        notif: bytes = b"",
    ) -> PostedRead:
        """``post`` over any prepared dlists (a lease board's bucket, say)."""
        handle = None
        try:
            handle = self._t.make_prepped_xfer(
                "READ", local_dlist, local_indices, remote_dlist, remote_indices, notif
            )
            posted_wall = time.perf_counter()
            state = self._t.transfer(handle)
        except TRANSPORT_ERRORS:
            if handle is not None:  # not in flight (its post failed): it binds nothing
                self.release(handle, None)
            raise
        return PostedRead(handle, state, posted_wall, time.perf_counter() - posted_wall)

    def state(self, handle: XferHandle, what: str) -> XferState:
        """Poll a posted READ; a failing poll counts as "ERR"."""
        try:
            return self._t.check_xfer_state(handle)
        except NixlTransportError as e:
            logger.warning("checking the READ of %s failed: %s", what, e)
            return "ERR"

    def release(
        self,
        handle: XferHandle,
        remote: RemoteEngine | None,
        on_freed: Callable[[], None] | None = None,
    ) -> bool:
        """Release a READ's handle (cancelling it if in flight); False if that failed: the
        handle is retried, keeps ``remote`` bound meanwhile, and ``on_freed`` runs once a
        retry released it."""
        if self.cancel(handle):
            return True
        self._zombies.append((handle, remote, on_freed))
        return False

    def cancel(self, handle: XferHandle) -> bool:
        """Release a READ's handle, cancelling it if in flight; False if that failed (NIXL
        cannot cancel a READ its backend is still running): the handle stays live, the
        caller's to retry."""
        try:
            self._t.release_xfer_handle(handle)
        except NixlTransportError as e:
            if handle not in self._refused:  # retried every step: logged the first time
                self._refused.add(handle)
                logger.error("releasing transfer %s failed (%s); will retry", handle, e)
            return False
        self._refused.discard(handle)
        return True

    def retry_zombies(self) -> list[RemoteEngine]:
        """Retry the failed releases; the remote engines of those that succeeded (to unbind)."""
        zombies, self._zombies = self._zombies, []
        freed = []
        for handle, remote, on_freed in zombies:
            if not self.release(handle, remote, on_freed):
                continue
            if on_freed is not None:
                on_freed()
            if remote is not None:
                freed.append(remote)
        return freed

    def bound(self, remote: RemoteEngine) -> int:
        """How many unreleased handles keep ``remote`` bound."""
        return sum(1 for _, r, _ in self._zombies if r is remote)
