"""ReadXfers: posting planned READs, polling them, and releasing their handles on every path."""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

from kvbridge.nixl.remotes import TRANSPORT_ERRORS, RemoteEngine
from kvbridge.nixl.transfers import ReadPlan
from kvbridge.nixl.transport import (
    DlistHandle,
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


class ReadXfers:
    """Runs in a consumer worker; owns READ handles whose release failed, until it succeeds."""

    def __init__(self, transport: NixlTransport, local_dlist: DlistHandle):
        self._t = transport
        self._local_dlist = local_dlist
        self._zombies: list[XferHandle] = []  # handles whose release failed; retried

    def post(self, plan: ReadPlan, remote: RemoteEngine, notif: bytes = b"") -> PostedRead:
        """Make and post one READ over the dlists prepared once (no per-READ dlist: preparing
        and releasing VRAM dlists costs milliseconds); raises ``TRANSPORT_ERRORS`` having
        released what it made."""
        handle = None
        try:
            handle = self._t.make_prepped_xfer(
                "READ",
                self._local_dlist,
                plan.local_indices,
                remote.dlist,
                plan.remote_indices,
                notif,
            )
            posted_wall = time.perf_counter()
            state = self._t.transfer(handle)
        except TRANSPORT_ERRORS:
            self.release(handle, "a READ that failed to post")
            raise
        return PostedRead(handle, state, posted_wall)

    def state(self, handle: XferHandle, what: str) -> XferState:
        """Poll a posted READ; a failing poll counts as "ERR"."""
        try:
            return self._t.check_xfer_state(handle)
        except NixlTransportError as e:
            logger.warning("checking the READ of %s failed: %s", what, e)
            return "ERR"

    def release(self, handle: XferHandle | None, what: str) -> None:
        """Release a READ's handle (cancelling it if in flight)."""
        if handle is not None:
            self._release_xfer(handle)

    def _release_xfer(self, handle: XferHandle) -> None:
        try:
            self._t.release_xfer_handle(handle)
        except NixlTransportError as e:
            logger.error("releasing transfer %s failed (%s); will retry", handle, e)
            self._zombies.append(handle)

    def retry_zombies(self) -> None:
        zombies, self._zombies = self._zombies, []
        for handle in zombies:
            self._release_xfer(handle)
