"""ReadXfers: posting planned READs, polling them, and releasing their handles on every path."""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

from kvbridge.nixl.remotes import TRANSPORT_ERRORS, RemoteEngine, memory_type
from kvbridge.nixl.transfers import KVRegions, ReadPlan
from kvbridge.nixl.transport import (
    LOCAL_AGENT,
    DlistHandle,
    NixlTransport,
    NixlTransportError,
    XferHandle,
    XferItem,
    XferState,
)

logger = logging.getLogger(__name__)


class PostedRead(NamedTuple):
    """A posted READ: its transfer handle, per-transfer dlists and first state."""

    handle: XferHandle
    dlists: list[DlistHandle]  # per-transfer (merged) dlists, released with the handle
    state: XferState  # what ``transfer`` answered
    posted_wall: float  # perf_counter() just before ``transfer``


class ReadXfers:
    """Runs in a consumer worker; owns READ handles whose release failed, until it succeeds."""

    def __init__(self, transport: NixlTransport, local: KVRegions, local_dlist: DlistHandle):
        self._t = transport
        self._local = local
        self._local_dlist = local_dlist
        self._zombies: list[XferHandle] = []  # handles whose release failed; retried

    def post(self, plan: ReadPlan, remote: RemoteEngine, notif: bytes = b"") -> PostedRead:
        """Make and post one READ; raises ``TRANSPORT_ERRORS`` having released what it made."""
        dlists: list[DlistHandle] = []
        handle = None
        try:
            if plan.merged:
                local_dlist = self._prep(LOCAL_AGENT, plan.local_items, self._local, dlists)
                remote_dlist = self._prep(
                    remote.agent_name, plan.remote_items, remote.regions, dlists
                )
                idx = list(range(len(plan.local_items)))
                handle = self._t.make_prepped_xfer(
                    "READ", local_dlist, idx, remote_dlist, idx, notif
                )
            else:
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
            self.release(handle, dlists, "a READ that failed to post")
            raise
        return PostedRead(handle, dlists, state, posted_wall)

    def _prep(
        self, agent: str, items: list[XferItem], regions: KVRegions, made: list[DlistHandle]
    ) -> DlistHandle:
        handle = self._t.prep_xfer_dlist(agent, self._t.get_xfer_descs(items, memory_type(regions)))
        made.append(handle)
        return handle

    def state(self, handle: XferHandle, what: str) -> XferState:
        """Poll a posted READ; a failing poll counts as "ERR"."""
        try:
            return self._t.check_xfer_state(handle)
        except NixlTransportError as e:
            logger.warning("checking the READ of %s failed: %s", what, e)
            return "ERR"

    def release(self, handle: XferHandle | None, dlists: list[DlistHandle], what: str) -> None:
        """Release a READ's handle (cancelling it if in flight) and its dlists."""
        if handle is not None:
            self._release_xfer(handle)
        for dlist in dlists:
            try:
                self._t.release_dlist_handle(dlist)
            except NixlTransportError as e:
                logger.error("releasing a dlist of %s failed: %s", what, e)
        dlists.clear()

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
