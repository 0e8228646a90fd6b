"""``FakeNixlWrapper``: the NIXL transport without NIXL, for tests (SPEC §4)."""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar

from kvbridge.nixl.transport import (
    DlistHandle,
    Indices,
    LiveCounts,
    MemoryType,
    NixlHandleError,
    NixlTransport,
    NixlTransportError,
    RegDescs,
    RegItem,
    XferDescs,
    XferHandle,
    XferItem,
    XferOp,
    XferState,
    XferTelemetry,
    check_memory_type,
    check_xfer_op,
    is_local_agent,
)

P = ParamSpec("P")
R = TypeVar("R")
FailMode = Literal["post", "check"]


@dataclass(frozen=True)
class FakeDescriptor:
    """One descriptor; ``uid`` makes every descriptor unique, even for the same memory."""

    uid: int
    addr: int
    length: int
    device_id: int
    memory_type: MemoryType

    def contains(self, other: FakeDescriptor) -> bool:
        return (
            self.memory_type == other.memory_type
            and self.device_id == other.device_id
            and self.addr <= other.addr
            and other.addr + other.length <= self.addr + self.length
        )


@dataclass
class _Dlist:
    agent_name: str
    descs: list[FakeDescriptor]


@dataclass
class _Xfer:
    remote_agent: str
    pairs: list[tuple[FakeDescriptor, FakeDescriptor]]  # (local, remote)
    notif_msg: bytes
    fail: FailMode | None = None
    state: XferState | None = None  # None until posted
    polls: int = 0
    posted_at: float = 0.0
    done_at: float = 0.0


def _recorded(
    method: Callable[Concatenate[FakeNixlWrapper, P], R],
) -> Callable[Concatenate[FakeNixlWrapper, P], R]:
    """Record the call, refuse it after ``close``, and raise an injected failure if one is due."""

    @functools.wraps(method)
    def wrapper(self: FakeNixlWrapper, *args: P.args, **kwargs: P.kwargs) -> R:
        name = method.__name__
        self.calls.append((name, args, dict(kwargs)))
        if self._closed:
            raise NixlTransportError(f"{name}: transport {self.agent_name!r} is closed", "CLOSED")
        pending = self._injected.get(name)
        if pending:
            raise pending.pop(0)
        return method(self, *args, **kwargs)

    return wrapper


class FakeNixlWrapper(NixlTransport):
    """Runs anywhere, in-process; owns fake handles and descriptors with real NIXL's rules.

    - Descriptors and handles are fresh and unique; releasing one twice raises ``NixlHandleError``.
    - ``check_xfer_state`` answers "PROC" for the first ``cycles_before_xfer_done`` polls of each
      handle, then "DONE"; ``fail_xfer`` and ``fail_next_xfers`` make handles end in "ERR".
    - Local dlists must lie in registered memory; remote dlists need a loaded remote agent;
      transfers need equal, non-empty index lists of equal-length descriptors (as NIXL checks).
    - Every transport call is appended to ``calls``; ``fail_next_call`` makes one raise.
    - READs move no bytes (``FakeFabric``'s agents do): a lease-board READ finds 0 there, so
      a load waits for the lease answer, as with a producer without a board.
    """

    AGENT_METADATA = b"kvbridge-fake-nixl-agent"
    REMOTE_AGENT_NAME = "fake-remote"

    def __init__(
        self,
        agent_name: str = "fake",
        *,
        cycles_before_xfer_done: int = 0,
        fail_next_xfers: int = 0,
        fail_xfers_on_post: bool = False,
        **_ignored: object,
    ) -> None:
        """The keywords are the knobs ``kv_connector_extra_config.fake_nixl`` may set."""
        if cycles_before_xfer_done < 0:
            raise ValueError(f"cycles_before_xfer_done must be >= 0, got {cycles_before_xfer_done}")
        self.agent_name = agent_name
        self.cycles_before_xfer_done = cycles_before_xfer_done
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.sent_notifs: list[tuple[str, bytes]] = []  # standalone and transfer notifications
        self._handles = itertools.count(1)
        self._uids = itertools.count(1)
        self._registered: dict[int, list[FakeDescriptor]] = {}  # id(descs) -> descs
        self._dlists: dict[DlistHandle, _Dlist] = {}
        self._xfers: dict[XferHandle, _Xfer] = {}
        self._remote_agents: set[str] = set()
        self._inbox: dict[str, list[bytes]] = {}
        mode: FailMode = "post" if fail_xfers_on_post else "check"
        self._fail_next: list[FailMode] = [mode] * fail_next_xfers
        self._injected: dict[str, list[BaseException]] = {}
        self._closed = False

    # -- test controls -----------------------------------------------------------------------
    def calls_to(self, name: str) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
        """The ``(args, kwargs)`` of every recorded call of ``name``, in order."""
        return [(args, kwargs) for called, args, kwargs in self.calls if called == name]

    def deliver_notif(self, agent_name: str, msg: bytes) -> None:
        """Queue a notification from ``agent_name``; the next ``get_new_notifs`` returns it."""
        self._inbox.setdefault(agent_name, []).append(msg)

    def fail_xfer(self, handle: XferHandle, *, on_post: bool = False) -> None:
        """Make ``handle`` end in "ERR": from ``transfer`` if ``on_post``, else when polled."""
        self._xfer(handle).fail = "post" if on_post else "check"

    def fail_next_xfers(self, n: int, *, on_post: bool = False) -> None:
        """Make the next ``n`` transfers created by ``make_prepped_xfer`` end in "ERR"."""
        self._fail_next.extend(["post" if on_post else "check"] * n)

    def fail_next_call(self, name: str, exc: BaseException | None = None) -> None:
        """Make the next call of method ``name`` raise ``exc`` (default ``NixlTransportError``)."""
        if not callable(getattr(NixlTransport, name, None)) or name.startswith("_"):
            raise ValueError(f"fail_next_call: {name!r} is not a transport method")
        error = exc or NixlTransportError(f"{name}: injected failure", "BACKEND")
        self._injected.setdefault(name, []).append(error)

    # -- memory ------------------------------------------------------------------------------
    @_recorded
    def get_reg_descs(
        self, items: Sequence[RegItem], memory_type: MemoryType
    ) -> list[FakeDescriptor]:
        return self._make_descs(items, memory_type)

    @_recorded
    def register_memory(self, descs: RegDescs) -> None:
        checked = self._check_descs(descs)
        if id(checked) in self._registered:
            raise NixlTransportError("register_memory: descriptors already registered", "EXISTS")
        self._registered[id(checked)] = checked

    @_recorded
    def deregister_memory(self, descs: RegDescs) -> None:
        if self._registered.pop(id(descs), None) is None:
            raise NixlHandleError("deregister_memory: descriptors not registered (or deregistered)")

    # -- descriptor lists --------------------------------------------------------------------
    @_recorded
    def get_xfer_descs(
        self, items: Sequence[XferItem], memory_type: MemoryType
    ) -> list[FakeDescriptor]:
        return self._make_descs(items, memory_type)

    @_recorded
    def prep_xfer_dlist(self, agent_name: str, descs: XferDescs) -> DlistHandle:
        checked = self._check_descs(descs)
        if is_local_agent(agent_name) or agent_name == self.agent_name:
            regions = [r for region in self._registered.values() for r in region]
            for desc in checked:
                if not any(region.contains(desc) for region in regions):
                    raise NixlTransportError(
                        f"prep_xfer_dlist: {desc} is outside registered memory", "NOT_FOUND"
                    )
        elif agent_name not in self._remote_agents:
            raise NixlTransportError(
                f"prep_xfer_dlist: remote agent {agent_name!r} not loaded", "NOT_FOUND"
            )
        handle = DlistHandle(next(self._handles))
        self._dlists[handle] = _Dlist(agent_name, list(checked))
        return handle

    @_recorded
    def release_dlist_handle(self, handle: DlistHandle) -> None:
        if self._dlists.pop(handle, None) is None:
            raise NixlHandleError(f"release_dlist_handle: unknown or released dlist {handle}")

    # -- agents and notifications ------------------------------------------------------------
    @_recorded
    def get_agent_metadata(self) -> bytes:
        return self.AGENT_METADATA

    @_recorded
    def add_remote_agent(self, metadata: bytes) -> str:
        self._remote_agents.add(self.REMOTE_AGENT_NAME)
        return self.REMOTE_AGENT_NAME

    @_recorded
    def remove_remote_agent(self, agent_name: str) -> None:
        self._remote_agents.discard(agent_name)

    @_recorded
    def get_new_notifs(self) -> dict[str, list[bytes]]:
        inbox, self._inbox = self._inbox, {}
        return inbox

    @_recorded
    def send_notif(self, remote_agent: str, msg: bytes) -> None:
        self._require_remote("send_notif", remote_agent)
        self.sent_notifs.append((remote_agent, msg))

    # -- transfers ---------------------------------------------------------------------------
    @_recorded
    def make_prepped_xfer(
        self,
        op: XferOp,
        local_dlist: DlistHandle,
        local_indices: Indices,
        remote_dlist: DlistHandle,
        remote_indices: Indices,
        notif_msg: bytes = b"",
    ) -> XferHandle:
        check_xfer_op(op)
        local, remote = self._dlist(local_dlist), self._dlist(remote_dlist)
        if not is_local_agent(local.agent_name) or is_local_agent(remote.agent_name):
            raise NixlTransportError(
                "make_prepped_xfer: local must be local, remote must be remote", "INVALID_PARAM"
            )
        if remote.agent_name != self.agent_name:
            self._require_remote("make_prepped_xfer", remote.agent_name)
        if len(local_indices) == 0 or len(local_indices) != len(remote_indices):
            raise NixlTransportError(
                f"make_prepped_xfer: need equal non-empty index lists, got "
                f"{len(local_indices)} local and {len(remote_indices)} remote",
                "INVALID_PARAM",
            )
        pairs = []
        for i, j in zip(local_indices, remote_indices):
            if not (0 <= i < len(local.descs) and 0 <= j < len(remote.descs)):
                raise NixlTransportError(
                    f"make_prepped_xfer: index out of range ({i}, {j})", "INVALID_PARAM"
                )
            if local.descs[i].length != remote.descs[j].length:
                raise NixlTransportError(
                    f"make_prepped_xfer: length mismatch at ({i}, {j})", "INVALID_PARAM"
                )
            pairs.append((local.descs[i], remote.descs[j]))
        fail = self._fail_next.pop(0) if self._fail_next else None
        handle = XferHandle(next(self._handles))
        self._xfers[handle] = _Xfer(remote.agent_name, pairs, bytes(notif_msg), fail)
        return handle

    @_recorded
    def transfer(self, handle: XferHandle) -> XferState:
        xfer = self._xfer(handle)
        if xfer.state == "PROC":
            raise NixlTransportError(f"transfer: {handle} is still in flight", "REPOST_ACTIVE")
        xfer.posted_at, xfer.polls = time.monotonic(), 0
        xfer.state = "ERR" if xfer.fail == "post" else "PROC"
        return xfer.state

    @_recorded
    def check_xfer_state(self, handle: XferHandle) -> XferState:
        xfer = self._xfer(handle)
        if xfer.state is None:
            raise NixlTransportError(f"check_xfer_state: {handle} was never posted", "NOT_POSTED")
        if xfer.fail is not None:
            xfer.state = "ERR"
        elif xfer.state == "PROC":
            if xfer.polls < self.cycles_before_xfer_done:
                xfer.polls += 1
            else:
                xfer.state, xfer.done_at = "DONE", time.monotonic()
                if xfer.notif_msg:
                    self.sent_notifs.append((xfer.remote_agent, xfer.notif_msg))
        return xfer.state

    @_recorded
    def release_xfer_handle(self, handle: XferHandle) -> None:
        if self._xfers.pop(handle, None) is None:
            raise NixlHandleError(f"release_xfer_handle: unknown or released transfer {handle}")

    @_recorded
    def get_xfer_telemetry(self, handle: XferHandle) -> XferTelemetry:
        xfer = self._xfer(handle)
        runs = sum(
            1
            for k, (loc, rem) in enumerate(xfer.pairs)
            if k == 0
            or xfer.pairs[k - 1][0].addr + xfer.pairs[k - 1][0].length != loc.addr
            or xfer.pairs[k - 1][1].addr + xfer.pairs[k - 1][1].length != rem.addr
        )
        duration = max(0.0, xfer.done_at - xfer.posted_at) if xfer.state == "DONE" else 0.0
        return XferTelemetry(
            start_time_us=int(xfer.posted_at * 1e6),
            post_duration_us=0,
            xfer_duration_us=int(duration * 1e6),
            total_bytes=sum(loc.length for loc, _ in xfer.pairs),
            desc_count=runs,
        )

    # -- accounting ----------------------------------------------------------------------------
    @property
    def num_live_xfer_handles(self) -> int:
        return len(self._xfers)

    @property
    def num_live_dlist_handles(self) -> int:
        return len(self._dlists)

    @property
    def num_registered_regions(self) -> int:
        return sum(len(descs) for descs in self._registered.values())

    @property
    def num_remote_agents(self) -> int:
        return len(self._remote_agents)

    def close(self) -> LiveCounts:
        if self._closed:
            return LiveCounts(0, 0, 0, 0)
        held = self.live_counts()
        self._xfers.clear()
        self._dlists.clear()
        self._registered.clear()
        self._remote_agents.clear()
        self._closed = True
        return held

    # -- internals -----------------------------------------------------------------------------
    def _make_descs(
        self, items: Sequence[RegItem] | Sequence[XferItem], memory_type: MemoryType
    ) -> list[FakeDescriptor]:
        check_memory_type(memory_type)
        if not items:
            raise ValueError("descriptor items must not be empty")
        descs = []
        for item in items:
            addr, length, device_id = item[0], item[1], item[2]
            if length <= 0 or addr < 0:
                raise ValueError(f"bad descriptor item {item!r}: need addr >= 0 and length > 0")
            descs.append(FakeDescriptor(next(self._uids), addr, length, device_id, memory_type))
        return descs

    @staticmethod
    def _check_descs(descs: object) -> list[FakeDescriptor]:
        if not isinstance(descs, list) or not all(isinstance(d, FakeDescriptor) for d in descs):
            raise TypeError(f"expected descriptors from this transport, got {type(descs).__name__}")
        return descs

    def _require_remote(self, op: str, agent_name: str) -> None:
        if agent_name not in self._remote_agents:
            raise NixlTransportError(f"{op}: remote agent {agent_name!r} not loaded", "NOT_FOUND")

    def _dlist(self, handle: DlistHandle) -> _Dlist:
        dlist = self._dlists.get(handle)
        if dlist is None:
            raise NixlHandleError(f"unknown or released dlist {handle}")
        return dlist

    def _xfer(self, handle: XferHandle) -> _Xfer:
        xfer = self._xfers.get(handle)
        if xfer is None:
            raise NixlHandleError(f"unknown or released transfer {handle}")
        return xfer
