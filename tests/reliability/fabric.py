"""FaultyFabric: kvbridge's ``FakeFabric`` (linked FakeNixlWrappers that move real bytes and
notifications in-process) with fault switches on top.

- ``drop(*kinds)`` loses every later notification of those kinds ("done", "heartbeat",
  "release"), as a lossy network would;
- ``crash(agent)`` makes an agent unreachable the way real NIXL reports it: transfers from it
  in flight end in "ERR", posting a new one or notifying it raises ``REMOTE_DISCONNECT``.

The per-agent controls of ``FakeNixlWrapper`` (``fail_next_xfers``, ``fail_next_call``,
``cycles_before_xfer_done``) work as usual on ``fabric.agent_of(engine_id)``.
"""

from __future__ import annotations

from typing import Any

from kvbridge.nixl.fake_fabric import FabricNixlWrapper, FakeFabric
from kvbridge.nixl.metadata import NotifKind, decode_notif
from kvbridge.nixl.transport import NixlTransportError, XferHandle, XferState
from kvbridge.nixl.transport_factory import NOTIFY_SUFFIX


class FaultyFabric(FakeFabric):
    """Runs in the test process; owns the linked agents and the fault switches."""

    def __init__(self, cycles_before_xfer_done: int = 1) -> None:
        super().__init__(cycles_before_xfer_done)
        self.drop_kinds: set[NotifKind] = set()
        self.crashed: set[str] = set()
        self.num_dropped = 0

    def factory(self, agent_name: str) -> FaultyNixl:
        """The ``nixl_wrapper`` callable of a NixlConnector config."""
        return FaultyNixl(agent_name, self, cycles_before_xfer_done=self.cycles_before_xfer_done)

    def drop(self, *kinds: NotifKind) -> None:
        self.drop_kinds.update(kinds)

    def crash(self, agent_name: str) -> None:
        self.crashed.add(agent_name)

    def agent_of(self, engine_id: str) -> FaultyNixl:
        found = [  # the engine's worker agent, not its notification agent
            a
            for name, a in self.agents.items()
            if name.startswith(f"{engine_id}-") and not name.endswith(NOTIFY_SUFFIX)
        ]
        if len(found) != 1 or not isinstance(found[0], FaultyNixl):
            raise LookupError(f"{len(found)} agents of engine {engine_id!r}")
        return found[0]

    def deliver(self, sender: str, receiver: str, msg: bytes) -> None:
        lost = sender in self.crashed or receiver in self.crashed
        if lost or decode_notif(msg).kind in self.drop_kinds:
            self.num_dropped += 1
            return
        super().deliver(sender, receiver, msg)


class FaultyNixl(FabricNixlWrapper):
    """Runs in the test process; a fabric agent that sees crashed peers as disconnected."""

    fabric: FaultyFabric

    def __init__(self, agent_name: str, fabric: FaultyFabric, **kwargs: Any) -> None:
        super().__init__(agent_name, fabric, **kwargs)

    def send_notif(self, remote_agent: str, msg: bytes) -> None:
        self._check_reachable("send_notif", remote_agent)
        super().send_notif(remote_agent, msg)

    def transfer(self, handle: XferHandle) -> XferState:
        xfer = self._xfers.get(handle)
        if xfer is not None:
            self._check_reachable("transfer", xfer.remote_agent)
        return super().transfer(handle)

    def check_xfer_state(self, handle: XferHandle) -> XferState:
        xfer = self._xfers.get(handle)
        if xfer is not None and xfer.remote_agent in self.fabric.crashed and xfer.fail is None:
            xfer.fail = "check"
        return super().check_xfer_state(handle)

    def _check_reachable(self, op: str, agent: str) -> None:
        if agent in self.fabric.crashed:
            raise NixlTransportError(
                f"{op}: remote agent {agent!r} disconnected", "REMOTE_DISCONNECT"
            )
