"""``NixlWrapper``: the NIXL transport over the real ``nixl`` package (UCX backend by default).

The package is imported when a wrapper is built, never when this module is imported, so the rest
of kvbridge works without NIXL installed. NIXL's own handle objects stay inside: callers get int
handles, plain ``str``/``bytes`` values, and ``NixlTransportError`` instead of NIXL's exceptions.
"""

from __future__ import annotations

import importlib
import itertools
import logging
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, NamedTuple, TypeVar, cast

import numpy as np
import numpy.typing as npt

from kvbridge.nixl.settings import DEFAULT_PROGRESS_DELAY_US
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

logger = logging.getLogger(__name__)
T = TypeVar("T")


NIXL_PACKAGES = ("nixl", "nixl_cu13", "nixl_cu12")  # import names, tried in this order
INSTALL_HINT = (
    "pip install nixl-cu12 (CUDA 12 or CPU-only hosts) or pip install nixl-cu13 (CUDA 13)"
)


class NixlApi(NamedTuple):
    """The pieces of an installed NIXL package that the wrapper uses."""

    package: str
    api: ModuleType  # <package>._api: nixl_agent, nixl_agent_config, nixl_thread_sync_t
    errors: tuple[type[Exception], ...]  # the binding's exception types
    bindings: ModuleType  # <package>._bindings: nixlAgent, nixlAgentConfig


def load_nixl_api() -> NixlApi:
    """Import the first installed NIXL package; ``ImportError`` naming the pip packages if none."""
    failures = []
    for package in NIXL_PACKAGES:
        try:
            api = importlib.import_module(f"{package}._api")
            bindings = importlib.import_module(f"{package}._bindings")
        except ImportError as exc:
            failures.append(f"{package}: {exc}")
            continue
        errors = tuple(
            obj
            for name, obj in vars(bindings).items()
            if name.startswith("nixl") and isinstance(obj, type) and issubclass(obj, Exception)
        )
        return NixlApi(package, api, errors, bindings)
    raise ImportError(
        f"no NIXL package is importable ({'; '.join(failures)}); install one: {INSTALL_HINT}"
    )


def make_agent(
    nixl: NixlApi,
    agent_name: str,
    *,
    backends: Sequence[str],
    num_threads: int,
    capture_telemetry: bool,
    thread_safe: bool,
    progress_delay_us: int,
) -> Any:
    """A ``nixl_agent`` whose progress thread wakes every ``progress_delay_us`` when idle.

    NIXL's UCX progress thread sleeps in ``poll()`` on the workers' event descriptors (a
    transfer's or a notification's arrival wakes it at once) with a timeout of the delay
    rounded up to whole milliseconds; ``nixl_agent.__init__`` fixes the delay at 0, so the
    thread polls with a zero timeout and spins a core. The agent is built without backends,
    its native agent replaced by one made from a ``nixlAgentConfig`` with the delay, and the
    backends created on that one as ``__init__`` would have (0: NIXL's own construction).
    """
    api, bind = nixl.api, nixl.bindings
    sync = api.nixl_thread_sync_t.NIXL_THREAD_SYNC_RW if thread_safe else None
    tuned = progress_delay_us > 0 and hasattr(getattr(bind, "nixlAgentConfig", None), "pthrDelay")
    config = api.nixl_agent_config(
        backends=[] if tuned else list(backends),
        num_threads=num_threads,
        capture_telemetry=capture_telemetry,
        sync_mode=sync,
    )
    agent = api.nixl_agent(agent_name, config)
    if not tuned:
        return agent
    native = bind.nixlAgentConfig()
    native.useProgThread = True
    native.useListenThread = False
    native.syncMode = (sync or api.nixl_thread_sync_t.NIXL_THREAD_SYNC_NONE).value
    native.pthrDelay = progress_delay_us
    native.captureTelemetry = capture_telemetry
    agent.agent = bind.nixlAgent(agent_name, native)  # the backend-less one is dropped
    for backend in backends:
        if backend in agent.plugin_list:  # a missing one is reported by the caller
            threaded = num_threads > 0 and backend in ("UCX", "OBJ", "LIBFABRIC")
            agent.create_backend(backend, {"num_threads": str(num_threads)} if threaded else {})
    return agent


def _int32(indices: Indices) -> npt.NDArray[np.int32]:
    """Indices as NIXL takes them whole (a list is converted index by index: 0.5 ms at 16k)."""
    return np.asarray(indices, dtype=np.int32)


def _error_code(exc: BaseException) -> str:
    text = str(exc)
    return text.removeprefix("NIXL_ERR_") if text.startswith("NIXL_ERR_") else type(exc).__name__


class NixlWrapper(NixlTransport):
    """Runs in a worker; owns one NIXL agent and every registration, dlist and transfer made on it.

    ``thread_safe`` selects NIXL's reader/writer agent lock, so a background handshake thread may
    call ``add_remote_agent`` while the worker thread posts and polls transfers.
    ``progress_delay_us``: the progress thread's wake-up period (``make_agent``).
    """

    def __init__(
        self,
        agent_name: str,
        *,
        backends: Sequence[str] = ("UCX",),
        num_threads: int = 0,
        capture_telemetry: bool = True,
        thread_safe: bool = True,
        progress_delay_us: int = DEFAULT_PROGRESS_DELAY_US,
    ) -> None:
        if not agent_name:
            raise ValueError("agent_name must be a non-empty string")
        if num_threads < 0:
            raise ValueError(f"num_threads must be >= 0, got {num_threads}")
        if not backends:
            raise ValueError("backends must name at least one NIXL backend")
        if progress_delay_us < 0:
            raise ValueError(f"progress_delay_us must be >= 0, got {progress_delay_us}")
        nixl = load_nixl_api()
        self.agent_name = agent_name
        self.package = nixl.package
        self.capture_telemetry = capture_telemetry
        self._errors = nixl.errors
        agent = self._call(
            "create agent",
            make_agent,
            nixl,
            agent_name,
            backends=backends,
            num_threads=num_threads,
            capture_telemetry=capture_telemetry,
            thread_safe=thread_safe,
            progress_delay_us=progress_delay_us,
        )
        missing = [b for b in backends if b not in agent.backends]
        if missing:  # NIXL only logs a warning for a missing plugin
            raise NixlTransportError(
                f"NIXL backends {missing} unavailable (plugins: {agent.get_plugin_list()})",
                "NOT_SUPPORTED",
            )
        self._agent: Any = agent
        self._ids = itertools.count(1)
        self._registered: dict[int, tuple[Any, int]] = {}  # id(descs) -> (descs, num regions)
        self._dlists: dict[DlistHandle, Any] = {}  # handle -> nixl_prepped_dlist_handle
        self._xfers: dict[XferHandle, Any] = {}  # handle -> nixl_xfer_handle
        self._remote_agents: set[str] = set()
        logger.info("NIXL agent %s up (%s, backends %s)", agent_name, self.package, list(backends))

    # -- memory ----------------------------------------------------------------------------
    def get_reg_descs(self, items: Sequence[RegItem], memory_type: MemoryType) -> RegDescs:
        check_memory_type(memory_type)
        if not items:
            raise ValueError("get_reg_descs: items must not be empty")
        rows = [(int(i[0]), int(i[1]), int(i[2]), str(i[3]) if len(i) > 3 else "") for i in items]
        descs = self._call("get_reg_descs", self._live().get_reg_descs, rows, memory_type)
        if descs is None:
            raise ValueError("get_reg_descs: NIXL rejected the items (see its log)")
        return descs

    def register_memory(self, descs: RegDescs) -> None:
        if id(descs) in self._registered:
            raise NixlTransportError("register_memory: descriptors already registered", "EXISTS")
        self._call("register_memory", self._live().register_memory, descs)
        self._registered[id(descs)] = (descs, int(cast(Any, descs).descCount()))

    def deregister_memory(self, descs: RegDescs) -> None:
        if id(descs) not in self._registered:
            raise NixlHandleError("deregister_memory: descriptors not registered (or deregistered)")
        self._call("deregister_memory", self._live().deregister_memory, descs)
        del self._registered[id(descs)]

    # -- descriptor lists ------------------------------------------------------------------
    def get_xfer_descs(self, items: Sequence[XferItem], memory_type: MemoryType) -> XferDescs:
        check_memory_type(memory_type)
        if not items:
            raise ValueError("get_xfer_descs: items must not be empty")
        rows = [(int(i[0]), int(i[1]), int(i[2])) for i in items]
        descs = self._call("get_xfer_descs", self._live().get_xfer_descs, rows, memory_type)
        if descs is None:
            raise ValueError("get_xfer_descs: NIXL rejected the items (see its log)")
        return descs

    def prep_xfer_dlist(self, agent_name: str, descs: XferDescs) -> DlistHandle:
        target = "NIXL_INIT_AGENT" if is_local_agent(agent_name) else agent_name
        native = self._call(
            f"prep_xfer_dlist({agent_name!r})", self._live().prep_xfer_dlist, target, descs
        )
        handle = DlistHandle(next(self._ids))
        self._dlists[handle] = native
        return handle

    def release_dlist_handle(self, handle: DlistHandle) -> None:
        native = self._dlists.get(handle)
        if native is None:
            raise NixlHandleError(f"release_dlist_handle: unknown or released dlist {handle}")
        self._call("release_dlist_handle", self._live().release_dlist_handle, native)
        del self._dlists[handle]

    # -- agents and notifications ------------------------------------------------------------
    def get_agent_metadata(self) -> bytes:
        return bytes(self._call("get_agent_metadata", self._live().get_agent_metadata))

    def add_remote_agent(self, metadata: bytes) -> str:
        name = self._call("add_remote_agent", self._live().add_remote_agent, metadata)
        name = name.decode() if isinstance(name, bytes) else str(name)
        self._remote_agents.add(name)
        return name

    def remove_remote_agent(self, agent_name: str) -> None:
        self._call(
            f"remove_remote_agent({agent_name!r})", self._live().remove_remote_agent, agent_name
        )
        self._remote_agents.discard(agent_name)

    def get_new_notifs(self) -> dict[str, list[bytes]]:
        raw = self._call("get_new_notifs", self._live().get_new_notifs)
        return {str(agent): [bytes(m) for m in msgs] for agent, msgs in raw.items()}

    def send_notif(self, remote_agent: str, msg: bytes) -> None:
        self._call(f"send_notif({remote_agent!r})", self._live().send_notif, remote_agent, msg)

    # -- transfers ---------------------------------------------------------------------------
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
        local, remote = self._native_dlist(local_dlist), self._native_dlist(remote_dlist)
        native = self._call(
            "make_prepped_xfer",
            self._live().make_prepped_xfer,
            *(op, local, _int32(local_indices), remote, _int32(remote_indices), notif_msg),
        )
        handle = XferHandle(next(self._ids))
        self._xfers[handle] = native
        return handle

    def transfer(self, handle: XferHandle) -> XferState:
        return cast(
            XferState, self._call("transfer", self._live().transfer, self._native_xfer(handle))
        )

    def check_xfer_state(self, handle: XferHandle) -> XferState:
        native = self._native_xfer(handle)
        return cast(
            XferState, self._call("check_xfer_state", self._live().check_xfer_state, native)
        )

    def release_xfer_handle(self, handle: XferHandle) -> None:
        self._call(
            "release_xfer_handle", self._live().release_xfer_handle, self._native_xfer(handle)
        )
        del self._xfers[handle]

    def get_xfer_telemetry(self, handle: XferHandle) -> XferTelemetry | None:
        native = self._native_xfer(handle)
        if not self.capture_telemetry:
            return None
        raw = self._call("get_xfer_telemetry", self._live().get_xfer_telemetry, native)
        return XferTelemetry(
            start_time_us=int(raw.startTime),
            post_duration_us=int(raw.postDuration),
            xfer_duration_us=int(raw.xferDuration),
            total_bytes=int(raw.totalBytes),
            desc_count=int(raw.descCount),
        )

    # -- accounting ------------------------------------------------------------------------
    @property
    def num_live_xfer_handles(self) -> int:
        return len(self._xfers)

    @property
    def num_live_dlist_handles(self) -> int:
        return len(self._dlists)

    @property
    def num_registered_regions(self) -> int:
        return sum(count for _, count in self._registered.values())

    @property
    def num_remote_agents(self) -> int:
        return len(self._remote_agents)

    def close(self) -> LiveCounts:
        if self._agent is None:
            return LiveCounts(0, 0, 0, 0)
        held = self.live_counts()
        if held != LiveCounts(0, 0, 0, 0):
            logger.warning("NIXL agent %s closed while holding %s", self.agent_name, held)
        for xfer in list(self._xfers):
            self._quietly(self.release_xfer_handle, xfer)
        for dlist in list(self._dlists):
            self._quietly(self.release_dlist_handle, dlist)
        for name in list(self._remote_agents):
            self._quietly(self.remove_remote_agent, name)
        for descs, _ in list(self._registered.values()):
            self._quietly(self.deregister_memory, descs)
        self._agent = None
        self._xfers.clear()
        self._dlists.clear()
        self._registered.clear()
        self._remote_agents.clear()
        return held

    # -- internals -----------------------------------------------------------------------------
    def _quietly(self, release: Callable[[T], None], item: T) -> None:
        try:
            release(item)
        except NixlTransportError as exc:
            logger.warning("NIXL agent %s: cleanup failed: %s", self.agent_name, exc)

    def _live(self) -> Any:
        if self._agent is None:
            raise NixlTransportError(f"NIXL agent {self.agent_name!r} is closed", "CLOSED")
        return self._agent

    def _native_dlist(self, handle: DlistHandle) -> Any:
        native = self._dlists.get(handle)
        if native is None:
            raise NixlHandleError(f"unknown or released dlist {handle}")
        return native

    def _native_xfer(self, handle: XferHandle) -> Any:
        native = self._xfers.get(handle)
        if native is None:
            raise NixlHandleError(f"unknown or released transfer {handle}")
        return native

    def _call(self, op: str, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``call(*args, **kwargs)``, NIXL's errors raised as ``NixlTransportError`` naming
        ``op`` (a function, not a context manager: those cost 1-3 us a call, made per READ)."""
        try:
            return call(*args, **kwargs)
        except self._errors as exc:
            raise NixlTransportError(f"{op}: {exc}", _error_code(exc)) from exc
