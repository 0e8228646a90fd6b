"""FakeFabric: FakeNixlWrappers of one process wired together, so bytes and notifications move.

``FakeNixlWrapper`` alone moves nothing: its READs complete without touching memory and its
notifications stay in ``sent_notifs``. Agents made by one ``FakeFabric`` know each other by
name (``get_agent_metadata`` carries it), a transfer copies its descriptors' bytes when it
completes (DRAM only; the addresses are this process's), and notifications (standalone or a
transfer's) land in the peer's ``get_new_notifs``. ``paused`` withholds notifications (a slow
or cut network) until ``resume``. Use ``fabric.wrapper`` as the ``nixl_wrapper`` callable.
"""

from __future__ import annotations

import ctypes
from typing import Any

from kvbridge.nixl.fake import FakeDescriptor, FakeNixlWrapper, _Xfer
from kvbridge.nixl.transport import (
    DlistHandle,
    Indices,
    LiveCounts,
    NixlTransportError,
    XferHandle,
    XferOp,
    XferState,
)

_PREFIX = b"kvbridge-fake-fabric:"


class FakeFabric:
    """Runs in a test process; owns the registry of its agents and the withheld notifications."""

    def __init__(self, cycles_before_xfer_done: int = 0) -> None:
        self.cycles_before_xfer_done = cycles_before_xfer_done
        self.agents: dict[str, FabricNixlWrapper] = {}
        self.paused = False
        self.withheld: list[tuple[str, str, bytes]] = []  # (from, to, message)
        self.num_bytes_moved = 0

    def wrapper(self, agent_name: str, **kwargs: Any) -> FabricNixlWrapper:
        kwargs.setdefault("cycles_before_xfer_done", self.cycles_before_xfer_done)
        return FabricNixlWrapper(agent_name, self, **kwargs)

    def deliver(self, sender: str, receiver: str, msg: bytes) -> None:
        if self.paused:
            self.withheld.append((sender, receiver, msg))
            return
        peer = self.agents.get(receiver)
        if peer is not None:  # a notification to a dead agent is lost, as on a network
            peer.deliver_notif(sender, msg)

    def resume(self) -> None:
        """Deliver what was withheld, in order, and stop withholding."""
        self.paused = False
        withheld, self.withheld = self.withheld, []
        for sender, receiver, msg in withheld:
            self.deliver(sender, receiver, msg)


class FabricNixlWrapper(FakeNixlWrapper):
    """Runs in a test process; a ``FakeNixlWrapper`` whose peers are its fabric's other agents."""

    def __init__(self, agent_name: str, fabric: FakeFabric, **kwargs: Any) -> None:
        super().__init__(agent_name, **kwargs)
        if agent_name in fabric.agents:
            raise ValueError(f"FakeFabric: agent {agent_name!r} exists already")
        self.fabric = fabric
        self._ops: dict[XferHandle, XferOp] = {}
        fabric.agents[agent_name] = self

    def get_agent_metadata(self) -> bytes:
        super().get_agent_metadata()
        return _PREFIX + self.agent_name.encode()

    def add_remote_agent(self, metadata: bytes) -> str:
        super().add_remote_agent(metadata)
        self._remote_agents.discard(self.REMOTE_AGENT_NAME)
        if not metadata.startswith(_PREFIX):
            raise NixlTransportError("add_remote_agent: not a fabric agent's metadata", "INVALID")
        name = metadata[len(_PREFIX) :].decode()
        self._remote_agents.add(name)
        return name

    def send_notif(self, remote_agent: str, msg: bytes) -> None:
        super().send_notif(remote_agent, msg)
        self.fabric.deliver(self.agent_name, remote_agent, msg)

    def make_prepped_xfer(
        self,
        op: XferOp,
        local_dlist: DlistHandle,
        local_indices: Indices,
        remote_dlist: DlistHandle,
        remote_indices: Indices,
        notif_msg: bytes = b"",
    ) -> XferHandle:
        handle = super().make_prepped_xfer(
            op, local_dlist, local_indices, remote_dlist, remote_indices, notif_msg
        )
        self._ops[handle] = op
        return handle

    def check_xfer_state(self, handle: XferHandle) -> XferState:
        xfer = self._xfers.get(handle)
        before = None if xfer is None else xfer.state
        state = super().check_xfer_state(handle)
        if xfer is None or before != "PROC" or state != "DONE":
            return state
        if not self._move(xfer, self._ops[handle]):
            xfer.state = "ERR"
            return "ERR"
        if xfer.notif_msg:
            self.fabric.deliver(self.agent_name, xfer.remote_agent, xfer.notif_msg)
        return state

    def _move(self, xfer: _Xfer, op: XferOp) -> bool:
        """Copy the pairs' bytes; False (the transfer fails) if the peer or its memory is gone."""
        peer = self.fabric.agents.get(xfer.remote_agent)
        if peer is None:
            return False
        for local, remote in xfer.pairs:
            if local.memory_type != "DRAM" or remote.memory_type != "DRAM":
                raise NixlTransportError("FakeFabric moves DRAM only", "NOT_SUPPORTED")
            if not (self.owns(local) and peer.owns(remote)):
                return False
            src, dst = (remote, local) if op == "READ" else (local, remote)
            ctypes.memmove(dst.addr, src.addr, local.length)
            self.fabric.num_bytes_moved += local.length
        return True

    def owns(self, desc: FakeDescriptor) -> bool:
        """Whether ``desc`` lies inside memory this agent registered (and still has)."""
        return any(r.contains(desc) for region in self._registered.values() for r in region)

    def release_xfer_handle(self, handle: XferHandle) -> None:
        super().release_xfer_handle(handle)
        self._ops.pop(handle, None)

    def close(self) -> LiveCounts:
        held = super().close()
        if self.fabric.agents.get(self.agent_name) is self:
            del self.fabric.agents[self.agent_name]
        return held
