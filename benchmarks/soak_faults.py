"""Faults the soak injects: a decode-side NIXL transport that misbehaves on chosen READs, and
the plan of which READ, which post, and when the producer restarts.

``FaultyTransport`` wraps the real transport (it is the ``nixl_wrapper`` callable of the
consumer's NixlConnector config) and counts READ posts (``transfer`` calls):

- ``stuck_read``: that READ is posted but never reported done ("PROC" until its handle is
  released): the consumer must time it out, fail the load, recompute, and release it;
- ``failing_post``: posting that READ raises (a backend error);
- ``disconnect_post``: posting that READ raises ``REMOTE_DISCONNECT`` (the peer vanished).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields
from typing import Any

from kvbridge.nixl.transport import (
    DelegatingTransport,
    NixlTransport,
    NixlTransportError,
    XferHandle,
    XferState,
)


@dataclass(frozen=True)
class FaultPlan:
    """Which faults a soak injects (0: that fault is off). Post numbers count from 1."""

    stuck_read: int = 0
    failing_post: int = 0
    disconnect_post: int = 0
    restart_after: int = 0  # restart the producer once this many requests have been sent

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"{f.name}: must be >= 0, got {getattr(self, f.name)}")

    @property
    def any(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))

    @classmethod
    def for_soak(cls, requests: int) -> FaultPlan:
        """One of each, spread over a run of ``requests``: READs 5, 11 and 17 (every request
        that reaches the decode server posts about one), the restart half-way."""
        return cls(stuck_read=5, failing_post=11, disconnect_post=17, restart_after=requests // 2)


@dataclass
class FaultLog:
    """What was injected (the soak checks every planned fault happened)."""

    posts: int = 0
    stuck: int = 0
    failed_posts: int = 0
    disconnects: int = 0
    restarts: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class FaultyTransport(DelegatingTransport):
    """Runs in the consumer worker; the real transport with ``plan``'s READ faults."""

    def __init__(self, inner: NixlTransport, plan: FaultPlan, log: FaultLog) -> None:
        super().__init__(inner)
        self._plan = plan
        self._log = log
        self._stuck: set[XferHandle] = set()

    def transfer(self, handle: XferHandle) -> XferState:
        with self._log.lock:
            self._log.posts += 1
            n = self._log.posts
        if n == self._plan.failing_post:
            self._log.failed_posts += 1
            raise NixlTransportError(f"transfer: injected failure of post {n}", "BACKEND")
        if n == self._plan.disconnect_post:
            self._log.disconnects += 1
            raise NixlTransportError(
                f"transfer: injected disconnect at post {n}", "REMOTE_DISCONNECT"
            )
        state = self.inner.transfer(handle)
        if n == self._plan.stuck_read and state != "ERR":
            self._log.stuck += 1
            self._stuck.add(handle)
            return "PROC"
        return state

    def check_xfer_state(self, handle: XferHandle) -> XferState:
        if handle in self._stuck:
            return "PROC"
        return self.inner.check_xfer_state(handle)

    def release_xfer_handle(self, handle: XferHandle) -> None:
        self.inner.release_xfer_handle(handle)
        self._stuck.discard(handle)

    def __getattr__(self, name: str) -> Any:  # anything else a real transport offers
        return getattr(self.inner, name)
