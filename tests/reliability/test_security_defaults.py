"""Security defaults: loopback binds, no pickle on any wire, body limits, a strict loader.

- The NIXL side channel and the HTTP servers bind 127.0.0.1 unless configured otherwise
  (checked on the kernel's socket table, not just the config value); a consumer-only
  engine listens on nothing.
- No pickle-family module or pickling socket call anywhere in ``src``; the wire decoders are
  msgspec; config files use ``yaml.safe_load``.
- Bodies over ``max_body_bytes`` get 413 from the server and the proxy, whether they declare
  their length or stream it, and the server stays up.
- The module-path connector loader imports only the module the config names and accepts
  only a ``KVConnectorBase`` subclass; nothing else it finds is built or called.
"""

from __future__ import annotations

import ast
import asyncio
import logging
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.requests import Request as HttpRequest

import kvbridge
from e2e.http_fixtures import RunningServer, metric_value, running_server
from kvbridge.config import ConfigError, TransferConfig
from kvbridge.connector.base import KVConnectorRole
from kvbridge.connector.factory import create_connector
from kvbridge.nixl.settings import NixlSettings
from kvbridge.nixl.worker import NixlWorker
from kvbridge.serve.cli import build_parser
from kvbridge.serve.config_file import ProxyConfig, ServeConfig, load_serve_config
from kvbridge.serve.http_server import BackgroundServer
from kvbridge.serve.protocol import RequestError, read_body
from kvbridge.serve.proxy import build_proxy_app
from reliability import loader_targets
from reliability.fabric import FaultyFabric
from reliability.invariants import parts, wait_until
from reliability.pd import engine, nixl
from reliability.wire_cases import SPEC

SRC = Path(kvbridge.__file__).resolve().parent
PROC_NET = Path("/proc/net/tcp")


def listen_addresses(port: int) -> set[str]:
    """Local addresses with a socket in LISTEN state on ``port``, from the kernel's table."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.split(":")
            if int(hexport, 16) == port and state == "0A":  # 0A: LISTEN
                found.add(_ip(addr, width))
    return found


def _ip(hexaddr: str, width: int) -> str:
    if width == 8:
        return ".".join(str(b) for b in reversed(bytes.fromhex(hexaddr)))
    return "v6:" + hexaddr


needs_proc = pytest.mark.skipif(not PROC_NET.exists(), reason="needs Linux /proc/net/tcp")


# -- loopback binds -----------------------------------------------------------------------------
def test_every_listening_default_is_loopback() -> None:
    assert NixlSettings().side_channel_host == "127.0.0.1"
    assert TransferConfig(kv_connector="NixlConnector").kv_ip == "127.0.0.1"
    assert (
        NixlSettings.from_config(TransferConfig(kv_connector="NixlConnector")).side_channel_host
        == "127.0.0.1"
    )
    assert ServeConfig().host == "127.0.0.1"
    assert ProxyConfig(decode=("http://127.0.0.1:1",)).host == "127.0.0.1"
    flags = vars(build_parser().parse_args([]))
    assert load_serve_config(None, {k: v for k, v in flags.items() if k != "config"}).host == (
        "127.0.0.1"
    )


@needs_proc
@pytest.mark.parametrize("host", [None, "0.0.0.0"])
def test_side_channel_binds_where_configured_and_loopback_by_default(host: str | None) -> None:
    extra = {} if host is None else {"side_channel_host": host}
    producer = engine(nixl("kv_producer", "prefill", FaultyFabric(), **extra))
    consumer = engine(nixl("kv_consumer", "decode", FaultyFabric()))
    try:
        (worker,) = parts(producer, NixlWorker)
        assert worker.side_channel_port is not None
        assert listen_addresses(worker.side_channel_port) == {host or "127.0.0.1"}
        (reader,) = parts(consumer, NixlWorker)
        assert reader.side_channel_port is None  # a consumer serves nothing
    finally:
        producer.shutdown()
        consumer.shutdown()


@needs_proc
def test_http_servers_bind_loopback_by_default() -> None:
    with running_server() as server:
        assert listen_addresses(int(server.url.rsplit(":", 1)[1])) == {"127.0.0.1"}
    with BackgroundServer(build_proxy_app([], ["http://127.0.0.1:1"])) as proxy:
        assert listen_addresses(proxy.port) == {"127.0.0.1"}


# -- no pickle on any wire ----------------------------------------------------------------------
PICKLERS = {
    "pickle",
    "cPickle",
    "_pickle",
    "cloudpickle",
    "dill",
    "marshal",
    "shelve",
    "jsonpickle",
    "joblib",
}
PICKLING_CALLS = {"send_pyobj", "recv_pyobj", "send_serialized", "recv_serialized"}


def drives_own_children(rel: str) -> bool:
    """Benchmarks drive their own child processes over multiprocessing pipes (pickle, but
    local parent-child plumbing, never a socket a peer can reach); serving code must not."""
    return rel.startswith("bench/")


def offences(rel: str, source: str) -> list[str]:
    """Pickle-family imports, pickling socket calls, eval/exec and unsafe loaders in ``source``."""
    out = []
    for node in ast.walk(ast.parse(source, filename=rel)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module.split(".")[0]]
        if PICKLERS & set(names):
            out.append(f"{rel}:{node.lineno} imports {names}")
        if "multiprocessing" in names and not drives_own_children(rel):
            out.append(f"{rel}:{node.lineno} imports multiprocessing")
        if isinstance(node, ast.Attribute) and node.attr in PICKLING_CALLS:
            out.append(f"{rel}:{node.lineno} calls {node.attr}")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("eval", "exec", "__import__")
        ):
            out.append(f"{rel}:{node.lineno} calls {node.func.id}()")
        if (
            isinstance(node, ast.Attribute)
            and node.attr == "load"
            and isinstance(node.value, ast.Name)
            and node.value.id in ("torch", "yaml", "numpy", "np")
        ):
            out.append(f"{rel}:{node.lineno} calls {node.value.id}.load")
    return out


def test_no_pickle_family_import_or_pickling_call_in_src() -> None:
    found = [
        o
        for p in sorted(SRC.rglob("*.py"))
        for o in offences(p.relative_to(SRC).as_posix(), p.read_text())
    ]
    assert found == []


def test_the_scan_catches_each_kind_of_offence() -> None:
    bad = (
        "import pickle\nfrom cloudpickle import dumps\nimport multiprocessing\n"
        "sock.recv_pyobj()\neval('1')\ntorch.load(f)\nyaml.load(text)\n"
    )
    assert len(offences("serve/x.py", bad)) == 7
    assert offences("bench/nixl_peer.py", "import multiprocessing\n") == []


def test_the_wire_decoders_are_msgspec() -> None:
    """Every module that reads bytes from a peer decodes them with msgspec into a typed struct."""
    wire = {
        "nixl/handshake.py": "msgspec.msgpack.decode",
        "nixl/metadata.py": "msgspec.msgpack.Decoder",
        "nixl/lease_confirm.py": "msgspec.msgpack.Decoder",
        "serve/protocol.py": "msgspec.json.Decoder",
        "serve/proxy.py": "msgspec.json.decode",
    }
    for rel, call in wire.items():
        text = (SRC / rel).read_text()
        assert call in text, f"{rel} does not use {call}"
        assert "json.loads" not in text and "pickle" not in text.replace("no pickle", ""), rel


# -- body size limits -----------------------------------------------------------------------------
LIMIT = 1024


def _chunks(size: int) -> Iterator[bytes]:
    head = b'{"prompt": "'
    yield head
    for _ in range(size // 256):
        yield b"a" * 256
    yield b'"}'


@pytest.fixture(scope="module")
def small_limit_server() -> Iterator[RunningServer]:
    with running_server(max_body_bytes=LIMIT) as server:
        yield server


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_bodies_over_the_limit_get_413_from_server_and_proxy(
    small_limit_server: RunningServer, chunked: bool
) -> None:
    server = small_limit_server
    with BackgroundServer(build_proxy_app([], [server.url], max_body_bytes=LIMIT)) as proxy:
        for url in (server.url, proxy.url):
            with httpx.Client(base_url=url, timeout=30, trust_env=False) as client:
                body = b"".join(_chunks(4 * LIMIT))
                content = _chunks(4 * LIMIT) if chunked else body
                r = client.post(
                    "/v1/completions", content=content, headers={"content-type": "application/json"}
                )
                assert r.status_code == 413, (url, r.status_code, r.text)
                assert f"limit of {LIMIT} bytes" in r.json()["error"]["message"]
                ok = client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 1})
                assert ok.status_code == 200  # the limit is per request; the server is fine
    assert server.client.get("/health").status_code == 200


def test_the_server_reads_a_bounded_prefix_of_an_endless_body() -> None:
    """``read_body`` stops consuming a stream soon after the limit: memory stays bounded."""
    consumed = 0
    chunk = b"a" * 4096

    async def receive() -> dict[str, object]:
        nonlocal consumed
        consumed += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}  # never ends

    request = HttpRequest({"type": "http", "method": "POST", "headers": []}, receive)
    with pytest.raises(RequestError) as refused:
        asyncio.run(read_body(request, LIMIT))
    assert refused.value.status == 413
    assert consumed <= 64 * LIMIT + len(chunk)


def test_a_large_streamed_body_is_refused_and_the_server_stays_up(
    small_limit_server: RunningServer,
) -> None:
    with httpx.Client(base_url=small_limit_server.url, timeout=30, trust_env=False) as client:
        try:
            r = client.post(
                "/v1/completions",
                content=_chunks(8 << 20),
                headers={"content-type": "application/json"},
            )
            assert r.status_code == 413
        except httpx.TransportError:
            pass  # the server answered early and closed: also a refusal
    assert small_limit_server.client.get("/health").status_code == 200


def test_a_client_gone_before_its_body_arrived_is_499_not_an_error() -> None:
    async def receive() -> dict[str, object]:
        return {"type": "http.disconnect"}

    request = HttpRequest({"type": "http", "method": "POST", "headers": []}, receive)
    with pytest.raises(RequestError) as gone:
        asyncio.run(read_body(request, LIMIT))
    assert gone.value.status == 499


def test_clients_leaving_mid_body_leave_no_error_in_server_or_proxy_logs(
    small_limit_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = small_limit_server
    with BackgroundServer(build_proxy_app([], [server.url])) as proxy:
        uvicorn_errors = logging.getLogger("uvicorn.error")  # does not propagate to the root
        uvicorn_errors.addHandler(caplog.handler)
        try:
            for port in (server.server.port, proxy.port):
                with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                    conn.sendall(
                        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                        b'{"prompt": '
                    )
            wait_until(
                lambda: (
                    metric_value(server.metrics(), "kvbridge:request_rejected_total", status="499")
                    == 1
                    and metric_value(
                        httpx.get(proxy.url + "/metrics", trust_env=False).text,
                        "kvbridge:proxy_requests_total",
                        route="rejected",
                    )
                    == 1
                ),
                timeout_s=10,
                what="both saw the client leave",
            )
        finally:
            uvicorn_errors.removeHandler(caplog.handler)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


# -- the module-path connector loader -------------------------------------------------------------
def _build(name: str, module: str | None) -> object:
    cfg = TransferConfig(kv_connector=name, kv_connector_module_path=module)
    return create_connector(cfg, KVConnectorRole.SCHEDULER, SPEC)


@pytest.mark.parametrize(
    ("name", "module", "needle"),
    [
        ("NotAConnector", "reliability.loader_targets", "is not a kvbridge connector"),
        ("build_scheduler", "reliability.loader_targets", "is not a kvbridge connector"),
        ("NOT_A_CLASS", "reliability.loader_targets", "is not a kvbridge connector"),
        ("Missing", "reliability.loader_targets", "is not a kvbridge connector"),
        ("system", "os", "is not a kvbridge connector"),
        ("A", "reliability.no_such_module", "cannot import"),
        ("A", ".loader_targets", "cannot import"),
        ("reliability.loader_targets:RecordingConnector", None, "unknown connector"),
    ],
)
def test_loader_refuses_anything_but_a_named_connector_class(
    name: str, module: str | None, needle: str
) -> None:
    loader_targets.CALLS.clear()
    with pytest.raises(ConfigError, match=needle):
        _build(name, module)
    assert loader_targets.CALLS == []  # nothing it found was built or called


def test_loader_builds_the_named_connector_class() -> None:
    loader_targets.CALLS.clear()
    half = _build("RecordingConnector", "reliability.loader_targets")
    assert type(half).__name__ == "RecordingScheduler"
    assert loader_targets.CALLS == ["RecordingConnector.scheduler"]


def test_loader_imports_only_the_module_the_config_names() -> None:
    code = """
import sys
from kvbridge.config import TransferConfig
from kvbridge.connector.factory import get_connector_class
get_connector_class(TransferConfig(kv_connector="NoOpConnector"))
try:
    get_connector_class(TransferConfig(kv_connector="NixlConnector",
                                       kv_connector_module_path="kvbridge.connector.noop"))
except ValueError:
    pass
loaded = sorted(m for m in sys.modules if m.startswith(("kvbridge.nixl", "kvbridge.offload")))
print(loaded)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout
