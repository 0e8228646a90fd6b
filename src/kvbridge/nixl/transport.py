"""The NIXL transport interface (SPEC §3) shared by ``NixlWrapper`` and ``FakeNixlWrapper``.

A transfer, initiator side::

    get_reg_descs -> register_memory                       (once, local KV memory)
    add_remote_agent(peer metadata) -> remote name          (once per peer)
    get_xfer_descs -> prep_xfer_dlist(LOCAL_AGENT | name)   (once per side, per peer)
    make_prepped_xfer -> transfer -> check_xfer_state ... "DONE" | "ERR" -> release_xfer_handle

Handles are plain ints (``DlistHandle``, ``XferHandle``); descriptor lists are opaque values
that go back to the same transport. Releasing a handle twice, or one the transport never made,
raises ``NixlHandleError``: double release is a bug, not something to tolerate.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, NewType, TypeAlias

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

MemoryType = Literal["DRAM", "VRAM"]
XferOp = Literal["READ", "WRITE"]
XferState = Literal["DONE", "PROC", "ERR"]
DlistHandle = NewType("DlistHandle", int)
XferHandle = NewType("XferHandle", int)

XferItem: TypeAlias = tuple[int, int, int]  # (addr, length, device_id)
# dlist indices of a transfer: a list, or an int array (NIXL takes it without converting each)
Indices: TypeAlias = "Sequence[int] | npt.NDArray[np.integer[Any]]"
RegItem: TypeAlias = tuple[int, int, int] | tuple[int, int, int, str]  # (+ backend meta string)
RegDescs: TypeAlias = object  # opaque: what get_reg_descs returned
XferDescs: TypeAlias = object  # opaque: what get_xfer_descs returned

LOCAL_AGENT = "NIXL_INIT_AGENT"  # prep_xfer_dlist agent name for the local (initiator) side
MEMORY_TYPES: tuple[MemoryType, ...] = ("DRAM", "VRAM")
XFER_OPS: tuple[XferOp, ...] = ("READ", "WRITE")


class NixlTransportError(RuntimeError):
    """A NIXL operation failed; ``code`` is NIXL's status name (``NOT_FOUND``, ``BACKEND``...)."""

    def __init__(self, message: str, code: str = "UNKNOWN") -> None:
        super().__init__(message)
        self.code = code


class NixlHandleError(NixlTransportError):
    """A handle or descriptor list was unknown to this transport or already released."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="HANDLE")


class XferTelemetry(NamedTuple):
    """What one transfer request cost; times in microseconds as NIXL reports them."""

    start_time_us: int
    post_duration_us: int
    xfer_duration_us: int
    total_bytes: int
    desc_count: int


class LiveCounts(NamedTuple):
    """Resources a transport still holds; all zero once everything was released."""

    xfer_handles: int
    dlist_handles: int
    registered_regions: int
    remote_agents: int


def check_memory_type(memory_type: str) -> None:
    """``ValueError`` unless ``memory_type`` is one NIXL registers (both transports check)."""
    if memory_type not in MEMORY_TYPES:
        raise ValueError(f"memory_type must be one of {MEMORY_TYPES}, got {memory_type!r}")


def check_xfer_op(op: str) -> None:
    """``ValueError`` unless ``op`` is a transfer operation."""
    if op not in XFER_OPS:
        raise ValueError(f"make_prepped_xfer: op must be one of {XFER_OPS}, got {op!r}")


def is_local_agent(agent_name: str) -> bool:
    """True for the names that ``prep_xfer_dlist`` takes for the initiator's own side."""
    return agent_name in ("", LOCAL_AGENT)


class NixlTransport(ABC):
    """Runs in a worker; owns one NIXL agent, its registrations, dlists and transfer handles."""

    agent_name: str

    # -- memory ----------------------------------------------------------------------------
    @abstractmethod
    def get_reg_descs(self, items: Sequence[RegItem], memory_type: MemoryType) -> RegDescs:
        """Registration descriptors, one per ``(addr, length, device_id[, meta])`` item."""

    @abstractmethod
    def register_memory(self, descs: RegDescs) -> None:
        """Register ``descs`` with every backend that supports their memory type."""

    @abstractmethod
    def deregister_memory(self, descs: RegDescs) -> None:
        """Deregister ``descs``: the same object that was given to ``register_memory``."""

    # -- descriptor lists ------------------------------------------------------------------
    @abstractmethod
    def get_xfer_descs(self, items: Sequence[XferItem], memory_type: MemoryType) -> XferDescs:
        """Transfer descriptors, one per ``(addr, length, device_id)`` item, in order."""

    @abstractmethod
    def prep_xfer_dlist(self, agent_name: str, descs: XferDescs) -> DlistHandle:
        """Prepare ``descs`` for indexing by transfers.

        ``agent_name`` is ``LOCAL_AGENT`` (or "") for the initiator's own memory (the local side
        of a transfer), a remote agent's name for its memory, or this agent's own name for a
        loopback remote side. Local memory must lie inside registered regions.
        """

    @abstractmethod
    def release_dlist_handle(self, handle: DlistHandle) -> None:
        """Free a prepared list; ``NixlHandleError`` if unknown or already released."""

    # -- agents and notifications ------------------------------------------------------------
    @abstractmethod
    def get_agent_metadata(self) -> bytes:
        """This agent's metadata, to ship to peers out of band."""

    @abstractmethod
    def add_remote_agent(self, metadata: bytes) -> str:
        """Load a peer's metadata; returns the peer's agent name."""

    @abstractmethod
    def remove_remote_agent(self, agent_name: str) -> None:
        """Forget a peer; its prepared dlists become unusable (release them too)."""

    @abstractmethod
    def get_new_notifs(self) -> dict[str, list[bytes]]:
        """Notifications received since the last call, by sender agent name."""

    @abstractmethod
    def send_notif(self, remote_agent: str, msg: bytes) -> None:
        """Send a standalone notification to a loaded peer."""

    # -- transfers -------------------------------------------------------------------------
    @abstractmethod
    def make_prepped_xfer(
        self,
        op: XferOp,
        local_dlist: DlistHandle,
        local_indices: Indices,
        remote_dlist: DlistHandle,
        remote_indices: Indices,
        notif_msg: bytes = b"",
    ) -> XferHandle:
        """A transfer of ``local[i] <-> remote[j]`` pairs (same non-zero count on both sides).

        READ pulls remote into local, WRITE pushes local to remote; ``notif_msg`` (if any) is
        delivered to the remote agent when the transfer completes.
        """

    @abstractmethod
    def transfer(self, handle: XferHandle) -> XferState:
        """Post (or repost a finished) transfer; usually "PROC", "DONE" if already complete."""

    @abstractmethod
    def check_xfer_state(self, handle: XferHandle) -> XferState:
        """Poll a posted transfer: "PROC" while in flight, then "DONE" or "ERR"."""

    @abstractmethod
    def release_xfer_handle(self, handle: XferHandle) -> None:
        """Free a transfer (cancelling it if in flight); ``NixlHandleError`` if unknown."""

    @abstractmethod
    def get_xfer_telemetry(self, handle: XferHandle) -> XferTelemetry | None:
        """Cost of a finished transfer, or None when telemetry capture is off."""

    # -- accounting ------------------------------------------------------------------------
    @property
    @abstractmethod
    def num_live_xfer_handles(self) -> int:
        """Transfer handles made and not yet released."""

    @property
    @abstractmethod
    def num_live_dlist_handles(self) -> int:
        """Prepared descriptor lists not yet released."""

    @property
    @abstractmethod
    def num_registered_regions(self) -> int:
        """Registered memory regions (descriptors) not yet deregistered."""

    @property
    @abstractmethod
    def num_remote_agents(self) -> int:
        """Remote agents loaded and not yet removed."""

    def live_counts(self) -> LiveCounts:
        """All four counters; no leak means ``live_counts() == LiveCounts(0, 0, 0, 0)``."""
        return LiveCounts(
            self.num_live_xfer_handles,
            self.num_live_dlist_handles,
            self.num_registered_regions,
            self.num_remote_agents,
        )

    @abstractmethod
    def close(self) -> LiveCounts:
        """Release everything still held (logging it as leaked) and return what was; idempotent.

        Any later call other than ``close`` raises ``NixlTransportError``.
        """


class DelegatingTransport(NixlTransport):
    """Forwards every call to ``inner``; subclass it to change a few (fault injection)."""

    def __init__(self, inner: NixlTransport) -> None:
        self.inner = inner
        self.agent_name: str = getattr(inner, "agent_name", "")

    def get_reg_descs(self, items: Sequence[RegItem], memory_type: MemoryType) -> RegDescs:
        return self.inner.get_reg_descs(items, memory_type)

    def register_memory(self, descs: RegDescs) -> None:
        self.inner.register_memory(descs)

    def deregister_memory(self, descs: RegDescs) -> None:
        self.inner.deregister_memory(descs)

    def get_xfer_descs(self, items: Sequence[XferItem], memory_type: MemoryType) -> XferDescs:
        return self.inner.get_xfer_descs(items, memory_type)

    def prep_xfer_dlist(self, agent_name: str, descs: XferDescs) -> DlistHandle:
        return self.inner.prep_xfer_dlist(agent_name, descs)

    def release_dlist_handle(self, handle: DlistHandle) -> None:
        self.inner.release_dlist_handle(handle)

    def get_agent_metadata(self) -> bytes:
        return self.inner.get_agent_metadata()

    def add_remote_agent(self, metadata: bytes) -> str:
        return self.inner.add_remote_agent(metadata)

    def remove_remote_agent(self, agent_name: str) -> None:
        self.inner.remove_remote_agent(agent_name)

    def get_new_notifs(self) -> dict[str, list[bytes]]:
        return self.inner.get_new_notifs()

    def send_notif(self, remote_agent: str, msg: bytes) -> None:
        self.inner.send_notif(remote_agent, msg)

    def make_prepped_xfer(
        self,
        op: XferOp,
        local_dlist: DlistHandle,
        local_indices: Indices,
        remote_dlist: DlistHandle,
        remote_indices: Indices,
        notif_msg: bytes = b"",
    ) -> XferHandle:
        return self.inner.make_prepped_xfer(
            op, local_dlist, local_indices, remote_dlist, remote_indices, notif_msg
        )

    def transfer(self, handle: XferHandle) -> XferState:
        return self.inner.transfer(handle)

    def check_xfer_state(self, handle: XferHandle) -> XferState:
        return self.inner.check_xfer_state(handle)

    def release_xfer_handle(self, handle: XferHandle) -> None:
        self.inner.release_xfer_handle(handle)

    def get_xfer_telemetry(self, handle: XferHandle) -> XferTelemetry | None:
        return self.inner.get_xfer_telemetry(handle)

    @property
    def num_live_xfer_handles(self) -> int:
        return self.inner.num_live_xfer_handles

    @property
    def num_live_dlist_handles(self) -> int:
        return self.inner.num_live_dlist_handles

    @property
    def num_registered_regions(self) -> int:
        return self.inner.num_registered_regions

    @property
    def num_remote_agents(self) -> int:
        return self.inner.num_remote_agents

    def close(self) -> LiveCounts:
        return self.inner.close()
