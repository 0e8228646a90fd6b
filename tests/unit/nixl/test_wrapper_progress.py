"""NixlWrapper sets NIXL's progress-thread delay through the bindings (NIXL's Python API fixes
it at 0, a spinning thread); checked against stand-ins for NIXL's ``_api`` and ``_bindings``."""

from __future__ import annotations

import enum
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from kvbridge.config import ConfigError, TransferConfig
from kvbridge.nixl import worker as worker_module
from kvbridge.nixl.settings import DEFAULT_PROGRESS_DELAY_US, NixlSettings
from kvbridge.nixl.transport import LOCAL_AGENT
from kvbridge.nixl.wrapper import NixlApi, NixlWrapper, make_agent


class _Sync(enum.Enum):
    NIXL_THREAD_SYNC_NONE = 0
    NIXL_THREAD_SYNC_RW = 3


class _NativeConfig:
    """The bindings' ``nixlAgentConfig``: NIXL's defaults (class attributes, as pybind's
    properties are)."""

    useProgThread = False
    useListenThread = False
    syncMode = 0
    pthrDelay = 0
    captureTelemetry = False


class _NativeAgent:
    def __init__(self, name: str, config: _NativeConfig) -> None:
        self.name, self.config = name, config
        self.backends: list[tuple[str, dict[str, str]]] = []


class _ApiAgent:
    """``nixl_agent``: builds a native agent with delay 0 and its configured backends on it."""

    def __init__(self, name: str, conf: SimpleNamespace) -> None:
        native = _NativeConfig()
        native.useProgThread, native.pthrDelay = True, 0  # as NIXL's __init__ does
        self.agent = _NativeAgent(name, native)
        self.plugin_list = ["UCX"]
        self.backends: dict[str, object] = {}
        for backend in conf.backends:
            self.create_backend(backend, {})

    def create_backend(self, backend: str, init: dict[str, str]) -> None:
        self.agent.backends.append((backend, init))
        self.backends[backend] = object()

    def prep_xfer_dlist(self, agent: str, descs: object) -> object:
        return object()

    def make_prepped_xfer(self, *args: Any) -> tuple[Any, ...]:
        return args  # what the bindings were handed

    def release_xfer_handle(self, handle: object) -> None:
        pass

    def release_dlist_handle(self, handle: object) -> None:
        pass


def _nixl() -> NixlApi:
    api = SimpleNamespace(
        nixl_thread_sync_t=_Sync,
        nixl_agent_config=lambda **kw: SimpleNamespace(**kw),
        nixl_agent=_ApiAgent,
    )
    bindings = SimpleNamespace(nixlAgentConfig=_NativeConfig, nixlAgent=_NativeAgent)
    return NixlApi("fake_nixl", api, (), bindings)  # type: ignore[arg-type]


def _agent(delay: int, num_threads: int = 0) -> Any:
    return make_agent(
        _nixl(),
        "a",
        backends=("UCX",),
        num_threads=num_threads,
        capture_telemetry=True,
        thread_safe=True,
        progress_delay_us=delay,
    )


def test_the_delay_reaches_the_native_agent_that_holds_the_backends() -> None:
    agent = _agent(5000, num_threads=4)
    native = agent.agent
    assert native.config.pthrDelay == 5000
    assert native.config.useProgThread and native.config.captureTelemetry
    assert native.config.syncMode == _Sync.NIXL_THREAD_SYNC_RW.value
    assert native.backends == [("UCX", {"num_threads": "4"})]  # created on the tuned agent
    assert list(agent.backends) == ["UCX"]


def test_delay_zero_keeps_nixls_own_construction() -> None:
    agent = _agent(0)
    assert agent.agent.config.pthrDelay == 0
    assert agent.agent.backends == [("UCX", {})]


def test_indices_reach_nixl_as_one_int32_array(monkeypatch: pytest.MonkeyPatch) -> None:
    """A list is converted by NIXL's bindings index by index (0.5 ms at 16k indices); an int32
    array is taken whole (0.02 ms)."""
    monkeypatch.setattr("kvbridge.nixl.wrapper.load_nixl_api", _nixl)
    wrapper = NixlWrapper("w")
    local = wrapper.prep_xfer_dlist(LOCAL_AGENT, object())
    remote = wrapper.prep_xfer_dlist("w", object())
    for indices in ([3, 1, 2], np.array([3, 1, 2], dtype=np.int64)):
        handle = wrapper.make_prepped_xfer("READ", local, indices, remote, indices)
        native = wrapper._xfers[handle]
        for got in (native[2], native[4]):
            assert isinstance(got, np.ndarray) and got.dtype == np.int32
            assert got.tolist() == [3, 1, 2]
    wrapper.close()


def test_the_connector_passes_its_configured_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[dict[str, Any]] = []

    def wrapper(name: str, **kw: Any) -> str:
        made.append(kw)
        return name

    monkeypatch.setattr("kvbridge.nixl.wrapper.NixlWrapper", wrapper)
    for extra, want in (({}, DEFAULT_PROGRESS_DELAY_US), ({"progress_delay_us": 250}, 250)):
        settings = NixlSettings.from_config(_config(extra))
        worker_module.make_transport_factory(settings)("agent")
        assert made[-1]["progress_delay_us"] == want


def test_a_negative_delay_is_refused() -> None:
    with pytest.raises(ConfigError, match="progress_delay_us"):
        NixlSettings.from_config(_config({"progress_delay_us": -1}))


def _config(extra: dict[str, Any]) -> TransferConfig:
    return TransferConfig.from_dict(
        {
            "kv_connector": "NixlConnector",
            "kv_role": "kv_consumer",
            "engine_id": "e",
            "kv_connector_extra_config": extra,
        }
    )
