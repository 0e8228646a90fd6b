"""``kvbridge proxy``: P/D through the proxy equals monolithic (by the logprob oracle, streamed
and not); fallback, errors, round-robin."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from e2e.http_fixtures import (
    ENGINE_KWARGS,
    RunningServer,
    closed_port_url,
    metric_value,
    reference_tokens,
    running_server,
    sse_events,
)
from kvbridge.config import TransferConfig
from kvbridge.engine.engine import EngineConfig
from kvbridge.oracle import Trace, check, reference
from kvbridge.serve.http_server import BackgroundServer
from kvbridge.serve.proxy import build_proxy_app
from support.nixl_marks import HAVE_NIXL

pytestmark = pytest.mark.e2e

PROMPT = list(range(3, 43))  # 40 tokens: two full blocks and a partial one
BODY: dict[str, Any] = {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
NOOP = TransferConfig(kv_connector="NoOpConnector")


@pytest.fixture(scope="module")
def expected() -> list[int]:
    return reference_tokens([PROMPT], max_tokens=5, ignore_eos=True)[0]


@pytest.fixture(scope="module")
def expected_trace() -> Trace:
    """The monolithic engine's tokens and logprobs for ``PROMPT``: the oracle's reference."""
    return reference([PROMPT], EngineConfig(**ENGINE_KWARGS), max_tokens=5)[tuple(PROMPT)]


@contextmanager
def proxy(prefill: list[str], decode: list[str]) -> Iterator[httpx.Client]:
    with (
        BackgroundServer(build_proxy_app(prefill, decode, timeout_s=60)) as server,
        httpx.Client(base_url=server.url, timeout=60, trust_env=False) as client,
    ):
        yield client


def proxy_metric(client: httpx.Client, name: str, **labels: str) -> float:
    return metric_value(client.get("/metrics").text, name, **labels) or 0.0


@pytest.fixture(scope="module")
def noop_pd() -> Iterator[tuple[RunningServer, RunningServer]]:
    with running_server(kv_transfer_config=NOOP) as p, running_server(kv_transfer_config=NOOP) as d:
        yield p, d


# -- P/D equals monolithic ------------------------------------------------------------------------
def _nixl(role: str) -> dict[str, Any]:
    return {"kv_connector": "NixlConnector", "kv_role": role,
            "kv_connector_extra_config": {"side_channel_port": 0}}  # fmt: skip


def _multi(role: str) -> dict[str, Any]:
    offload = {"kv_connector": "SimpleCPUOffloadConnector", "kv_role": "kv_both",
               "kv_connector_extra_config": {"num_cpu_blocks": 32}}  # fmt: skip
    return {"kv_connector": "MultiConnector", "kv_role": role,
            "kv_connector_extra_config": {"connectors": [_nixl(role), offload]}}  # fmt: skip


def _pd_configs(kind: str) -> tuple[TransferConfig, TransferConfig]:
    """Producer and consumer configs, or a skip saying which piece is missing."""
    if not HAVE_NIXL:
        pytest.skip("P/D over NIXL: no NIXL package installed")
    make = _nixl if kind == "nixl" else _multi
    producer = TransferConfig.from_dict(make("kv_producer"))
    consumer = TransferConfig.from_dict(make("kv_consumer"))
    return producer, consumer


def _wait_released(server: RunningServer) -> None:
    """The engine holds no finished request's blocks (P: the decode side read and released)."""
    deadline = time.monotonic() + 30
    while server.loop.call(lambda e: e.has_unfinished_requests() or e.has_pending_transfers()):
        assert time.monotonic() < deadline, "blocks still held after 30s"
        time.sleep(0.02)
    server.loop.call(lambda e: e.check_integrity())


@pytest.mark.parametrize("kind", ["nixl", "multi"])
def test_pd_through_proxy_equals_monolithic(kind: str, expected_trace: Trace):
    producer, consumer = _pd_configs(kind)
    body = {**BODY, "logprobs": 2}
    with ExitStack() as stack:
        p = stack.enter_context(running_server(kv_transfer_config=producer))
        d = stack.enter_context(running_server(kv_transfer_config=consumer))
        client = stack.enter_context(proxy([p.url], [d.url]))
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        verdict = check(expected_trace, Trace.from_choices([r.json()["choices"][0]]))
        assert verdict.ok and verdict.compared == 5, verdict
        # first-token handover: P's token went to D, which took every prompt token from P
        assert r.json()["usage"]["prompt_tokens_details"]["external_tokens"] == len(PROMPT)
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
            events = sse_events(s.read().decode())
        assert events[-1] == "[DONE]"
        streamed = Trace.from_choices(e["choices"][0] for e in events[:-1] if e["choices"])
        verdict = check(expected_trace, streamed)
        assert verdict.ok and verdict.compared == 5, verdict
        assert proxy_metric(client, "kvbridge:proxy_requests_total", route="disaggregated") == 2
        remote = metric_value(d.metrics(), "kvbridge:prompt_tokens_by_source_total",
                              source="remote")  # fmt: skip
        assert remote is not None and remote >= len(PROMPT)
        moved = metric_value(d.metrics(), "kvbridge:nixl_bytes_transferred_sum",
                             connector="NixlConnector")  # fmt: skip
        assert moved is not None and moved > 0
        _wait_released(p)
        _wait_released(d)


def test_pd_with_noop_connectors_equals_monolithic(noop_pd, expected: list[int]):
    p, d = noop_pd
    with proxy([p.url], [d.url]) as client:
        r = client.post("/v1/completions", json=BODY)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == expected
        # NoOp returns no remote-prefill params, so the decode server computed the prompt.
        assert proxy_metric(client, "kvbridge:proxy_requests_total", route="local_prefill") == 1
    assert metric_value(p.metrics(), "kvbridge:generation_tokens_total") == 1  # max_tokens 1


# -- failures ---------------------------------------------------------------------------------
def test_prefill_down_falls_back_to_local_prefill(noop_pd, expected: list[int]):
    _, d = noop_pd
    with proxy([closed_port_url()], [d.url]) as client:
        r = client.post("/v1/completions", json=BODY)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == expected
        with client.stream("POST", "/v1/completions", json={**BODY, "stream": True}) as s:
            events = sse_events(s.read().decode())
        assert [t for e in events[:-1] for t in e["choices"][0]["token_ids"]] == expected
        assert proxy_metric(client, "kvbridge:proxy_prefill_failures_total") == 2


def _failing_prefill() -> Starlette:
    async def fail(_: Request) -> JSONResponse:
        return JSONResponse({"error": {"message": "boom", "code": 500}}, status_code=500)

    return Starlette(routes=[Route("/v1/completions", fail, methods=["POST"])])


def test_prefill_5xx_falls_back_to_local_prefill(noop_pd, expected: list[int]):
    _, d = noop_pd
    with BackgroundServer(_failing_prefill()) as bad, proxy([bad.url], [d.url]) as client:
        r = client.post("/v1/completions", json=BODY)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == expected
        assert proxy_metric(client, "kvbridge:proxy_prefill_failures_total") == 1


def test_client_errors_are_passed_through(noop_pd):
    p, d = noop_pd
    with proxy([p.url], [d.url]) as client:
        r = client.post("/v1/completions", json={**BODY, "bogus_field": 1})
        assert r.status_code == 400
        assert "`bogus_field`" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={**BODY, "kv_transfer_params": {}})
        assert r.status_code == 400
        assert "kv_transfer_params" in r.json()["error"]["message"]
        r = client.post("/v1/completions", content=b"{nope")
        assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
        assert client.post("/v1/completions", json=BODY).status_code == 200


def test_decode_down_is_502_naming_the_server(noop_pd):
    p, _ = noop_pd
    dead = closed_port_url()
    with proxy([p.url], [dead]) as client:
        for body in (BODY, {**BODY, "stream": True}):
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 502
            assert dead in r.json()["error"]["message"]


def test_round_robin_over_decode_servers(noop_pd):
    p, d = noop_pd

    def finished(server: RunningServer) -> float:
        text = server.metrics()
        return metric_value(text, "kvbridge:request_success_total", finished_reason="length") or 0

    with running_server(kv_transfer_config=NOOP) as d2, proxy([p.url], [d.url, d2.url]) as client:
        before = finished(d), finished(d2)
        for _ in range(4):
            assert client.post("/v1/completions", json={**BODY, "max_tokens": 2}).status_code == 200
        assert (finished(d) - before[0], finished(d2) - before[1]) == (2, 2)
