"""Helpers for the HTTP tests: real servers on 127.0.0.1, a monolithic oracle, metric parsing.

``StatsConnector`` (loaded through ``kv_connector_module_path="e2e.http_fixtures"``) moves
nothing but reports the stats keys the NIXL and offload connectors use, every step;
``GaugeConnector`` moves nothing and reports one gauge, ``things_held``, set by the test.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from kvbridge.config import TransferConfig
from kvbridge.connector.noop import NoOpConnector, NoOpScheduler
from kvbridge.connector.stats import KVConnectorStats
from kvbridge.engine.engine import EngineConfig, LLMEngine
from kvbridge.engine.request import RequestOutput
from kvbridge.engine.sampling import SamplingParams
from kvbridge.serve.config_file import ServeConfig
from kvbridge.serve.engine_loop import EngineLoop
from kvbridge.serve.http_server import BackgroundServer
from kvbridge.serve.server import build_server

ENGINE_KWARGS: dict[str, Any] = {"model": "tiny", "num_gpu_blocks": 64, "seed": 0}


class RunningServer:
    """A started server: its URL, the engine loop behind it, and a client."""

    def __init__(self, server: BackgroundServer, loop: EngineLoop) -> None:
        self.server = server
        self.loop = loop
        self.url = server.url
        self.client = httpx.Client(base_url=server.url, timeout=60.0, trust_env=False)

    def complete(self, **body: Any) -> httpx.Response:
        return self.client.post("/v1/completions", json=body)

    def metrics(self) -> str:
        r = self.client.get("/metrics")
        r.raise_for_status()
        return r.text


@contextmanager
def running_server(**config: Any) -> Iterator[RunningServer]:
    """``kvbridge serve`` with ``ENGINE_KWARGS`` (overridable) in a background thread."""
    values = {**ENGINE_KWARGS, **config}
    parts = build_server(ServeConfig(**values))
    with BackgroundServer(parts.app) as server:
        running = RunningServer(server, parts.loop)
        try:
            yield running
        finally:
            running.client.close()


def reference_tokens(prompts: list[list[int]], max_tokens: int, **sampling: Any) -> list[list[int]]:
    """Greedy (or seeded) tokens of a monolithic engine with the same weights."""
    with LLMEngine(EngineConfig(**ENGINE_KWARGS)) as engine:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, **sampling)
        return [out.token_ids for out in engine.generate(prompts, params)]


def reference_outputs(
    prompts: list[list[int]], max_tokens: int, **sampling: Any
) -> list[RequestOutput]:
    """Final outputs (tokens and, with ``logprobs=k``, logprobs) of a monolithic engine."""
    sampling.setdefault("temperature", 0.0)
    with LLMEngine(EngineConfig(**ENGINE_KWARGS)) as engine:
        return engine.generate(prompts, SamplingParams(max_tokens=max_tokens, **sampling))


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (the port was free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def sse_events(text: str) -> list[Any]:
    """The ``data:`` payloads of an SSE body, JSON-decoded (``[DONE]`` kept as a string)."""
    events: list[Any] = []
    for line in text.splitlines():
        if not line.startswith("data: "):
            continue
        payload = line.removeprefix("data: ")
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def metric_value(text: str, sample_name: str, **labels: str) -> float | None:
    """Value of one sample (e.g. ``kvbridge:prompt_tokens_total``) with these labels, or None."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                return float(sample.value)
    return None


def transfer_config(name: str, **extra: Any) -> TransferConfig:
    return TransferConfig(kv_connector=name, kv_connector_extra_config=dict(extra))


class StatsScheduler(NoOpScheduler):
    """Runs in the scheduler; matches nothing and reports a fixed stats delta every step."""

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        stats = KVConnectorStats()
        stats.observe("xfer_time_seconds", 0.002)
        stats.observe("bytes_transferred", 4096.0)
        stats.incr("num_failed_transfers", 1)
        stats.incr("gpu_to_cpu_bytes", 1024)
        stats.observe("gpu_to_cpu_time_s", 0.5)
        stats.incr("brand_new_counter", 3)
        return stats


class StatsConnector(NoOpConnector):
    """A NoOp connector whose scheduler half reports stats."""

    scheduler_cls = StatsScheduler


class GaugeScheduler(NoOpScheduler):
    """Runs in the scheduler; reports ``things_held`` = ``GaugeScheduler.value``."""

    value = 0

    def get_kv_connector_gauges(self) -> dict[str, int]:
        return {"things_held": GaugeScheduler.value}


class GaugeConnector(NoOpConnector):
    """A NoOp connector whose scheduler half reports a gauge the test sets."""

    scheduler_cls = GaugeScheduler
