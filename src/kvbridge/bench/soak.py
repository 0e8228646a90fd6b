"""``kvbridge bench soak``: many requests through proxy + prefill + decode, some cancelled.

One process runs a prefill server and a decode server (``kvbridge serve`` apps, each with a
MultiConnector of NixlConnector over real NIXL and a CPU offload tier small enough to evict),
the P/D proxy in front, and an asyncio client that keeps ``--concurrency`` requests in flight
and cancels ``--abort-fraction`` of them at a random moment. Then it proves: every completed
request's greedy tokens equal a monolithic engine's, both engines are back where they started
(no request, GPU block, CPU pin, lease, load, transfer handle or extra dlist left), nothing
was logged at ERROR, and every WARNING is of an expected kind. Same-run baseline: the
monolithic engine's requests/s on the same prompts, in-process (no HTTP, no P/D).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import re
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

import httpx
from rich.console import Console
from rich.table import Table

from kvbridge.config import TransferConfig
from kvbridge.connector.gauges import connector_gauges, nonzero
from kvbridge.engine.engine import EngineConfig, LLMEngine
from kvbridge.engine.sampling import SamplingParams
from kvbridge.nixl.transport import LiveCounts
from kvbridge.nixl.worker import NixlWorker
from kvbridge.serve.config_file import ServeConfig
from kvbridge.serve.http_server import BackgroundServer
from kvbridge.serve.proxy import build_proxy_app
from kvbridge.serve.server import ServerParts, build_server

logger = logging.getLogger(__name__)

# WARNING lines a clean soak may log: a CPU pool smaller than the GPU cache churns by design,
# and a client that leaves before the decode engine attached the producer lets a hold lapse.
EXPECTED_WARNINGS = (
    re.compile(r"CPU pool of \d+ blocks is smaller than the GPU cache"),
    re.compile(r"lease on \d+ blocks of \S+ lapsed"),
)
REQUEST_TIMEOUT_S = 60.0  # no answer by then: the soak reports a hang
NO_ANSWER = -1  # _Outcome.status of a request that timed out
_COUNTERS = (
    "prompt_tokens_by_source",
    "kv_offload_evictions",
    "kv_offload_total_bytes",
    "nixl_num_transfers",
    "nixl_num_kv_expired_reqs",
    "nixl_num_failed_transfers",
)


@dataclass(frozen=True)
class SoakConfig:
    requests: int = 150
    concurrency: int = 8
    abort_fraction: float = 0.1
    stream_fraction: float = 0.8
    num_prompts: int = 32
    max_tokens: int = 6
    block_size: int = 4
    gpu_blocks: int = 40  # a few requests' worth: the prefix cache evicts
    cpu_blocks: int = 64  # a quarter of the prompts' blocks: the CPU tier evicts too
    lease_s: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_fraction") and not 0.0 <= value <= 1.0:
                raise ValueError(f"{f.name}: must be in [0, 1], got {value}")
            if f.type == "int" and f.name != "seed" and value < 1:
                raise ValueError(f"{f.name}: must be >= 1, got {value}")
        if self.lease_s <= 0.5:
            raise ValueError(
                f"lease_s: must be > 0.5 (heartbeats every 0.25 s), got {self.lease_s}"
            )


@dataclass(frozen=True)
class SoakResult:
    requests: int
    completed: int
    aborted: int
    wall_s: float
    ttft_s: list[float]
    baseline_rps: float
    mismatched: list[str] = field(default_factory=list)  # requests whose tokens differ
    bad_status: list[str] = field(default_factory=list)  # unexpected HTTP answers
    leaks: list[str] = field(default_factory=list)
    unexpected_logs: list[str] = field(default_factory=list)
    lapsed_leases: int = 0
    counters: dict[str, float] = field(default_factory=dict)

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.wall_s

    def ttft_percentile(self, q: float) -> float:
        """TTFT quantile ``q`` (0..1) of the completed streamed requests, in seconds."""
        ordered = sorted(self.ttft_s) or [float("nan")]
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def problems(self) -> list[str]:
        return self.mismatched + self.bad_status + self.leaks + self.unexpected_logs


# -- the audit of an idle engine -----------------------------------------------------------------
class EngineBaseline(NamedTuple):
    free_blocks: int


def connector_parts(engine: LLMEngine) -> list[Any]:
    """Both connector halves of ``engine`` and, for a MultiConnector, all their children."""
    out: list[Any] = []
    todo = [engine.worker_connector, engine.scheduler_connector]
    while todo:
        part = todo.pop()
        if part is not None:
            out.append(part)
            todo.extend(reversed(getattr(part, "children", None) or []))
    return out


def engine_baseline(engine: LLMEngine) -> EngineBaseline:
    return EngineBaseline(engine.block_manager.num_free_blocks)


def idle_problems(engine: LLMEngine, base: EngineBaseline) -> list[str]:
    """What an engine with nothing to do still holds (empty: clean); integrity errors raise.

    Connector leaks are read from the connectors' own gauges, as ``/metrics`` exports them."""
    engine.check_integrity()
    out: list[str] = []
    if engine.has_unfinished_requests() or engine.has_pending_transfers():
        out.append(f"requests still live: {sorted(engine.scheduler.requests)[:8]}")
    if engine.block_manager.num_free_blocks != base.free_blocks:
        lost = base.free_blocks - engine.block_manager.num_free_blocks
        out.append(f"{lost} GPU blocks not back in the free pool")
    transfer = engine.config.kv_transfer_config
    name = transfer.kv_connector if transfer is not None else "none"
    out += nonzero(connector_gauges(name, engine.scheduler_connector, engine.worker_connector))
    for part in connector_parts(engine):
        if isinstance(part, NixlWorker):
            part.check_integrity()
    return out


class LogAudit(logging.Handler):
    """Collects every WARNING-or-worse record while installed."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def unexpected(self) -> list[str]:
        return [
            f"{r.levelname} {r.name}: {r.getMessage()[:200]}"
            for r in self.records
            if r.levelno >= logging.ERROR
            or not any(p.search(r.getMessage()) for p in EXPECTED_WARNINGS)
        ]

    def count(self, pattern: re.Pattern[str]) -> int:
        return sum(1 for r in self.records if pattern.search(r.getMessage()))


# -- the run ------------------------------------------------------------------------------------
def make_prompts(config: SoakConfig) -> list[list[int]]:
    """Four families of prompts sharing a prefix (cache and CPU-tier hits), 9-59 tokens."""
    rng = random.Random(config.seed)
    stems = [[rng.randrange(256) for _ in range(rng.randrange(8, 40))] for _ in range(4)]
    return [
        stems[i % 4] + [rng.randrange(256) for _ in range(rng.randrange(1, 21))]
        for i in range(config.num_prompts)
    ]


def _transfer_config(role: str, config: SoakConfig) -> TransferConfig:
    nixl = {
        "kv_connector": "NixlConnector",
        "kv_role": role,
        "kv_connector_extra_config": {
            "side_channel_port": 0,
            "kv_lease_duration_s": config.lease_s,
            "heartbeat_interval_s": 0.25,
            "slow_transfer_s": 30.0,
        },
    }
    offload = {
        "kv_connector": "SimpleCPUOffloadConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"num_cpu_blocks": config.cpu_blocks},
    }
    connectors = {"connectors": [nixl, offload]}
    return TransferConfig.from_dict(
        {"kv_connector": "MultiConnector", "kv_role": role, "kv_connector_extra_config": connectors}
    )


def _engine_kwargs(config: SoakConfig) -> dict[str, Any]:
    return {"model": "tiny", "block_size": config.block_size, "max_num_seqs": 16}


class _Outcome(NamedTuple):
    prompt: int
    label: str
    tokens: list[int] | None  # None: cancelled, or refused
    status: int | None  # None: cancelled by the client
    ttft: float | None


class _HangReport:
    """Logs every thread's stack at the first request that got no answer: what hung."""

    def __init__(self) -> None:
        self.logged = False

    def log(self, why: str) -> None:
        if self.logged:
            return
        self.logged = True
        names = {t.ident: t.name for t in threading.enumerate()}
        stacks = [
            f"--- {names.get(ident, ident)}\n" + "".join(traceback.format_stack(frame))
            for ident, frame in sys._current_frames().items()
        ]
        logger.error("%s; thread stacks:\n%s", why, "\n".join(stacks))


async def _one(
    client: httpx.AsyncClient, k: int, label: str, body: dict[str, Any], hang: _HangReport
) -> _Outcome:
    try:
        return await _send(client, k, label, body)
    except httpx.TimeoutException:
        hang.log(f"request {label} got no answer within {REQUEST_TIMEOUT_S:g}s")
        return _Outcome(k, label + " timed out", None, NO_ANSWER, None)


async def _send(client: httpx.AsyncClient, k: int, label: str, body: dict[str, Any]) -> _Outcome:
    start = time.perf_counter()
    if not body["stream"]:
        r = await client.post("/v1/completions", json=body)
        ok = r.status_code == 200
        return _Outcome(
            k, label, r.json()["choices"][0]["token_ids"] if ok else None, r.status_code, None
        )
    tokens: list[int] = []
    ttft = None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return _Outcome(k, label, None, r.status_code, None)
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                return _Outcome(k, label, None, int(event["error"]["code"]), None)
            new = event["choices"][0]["token_ids"] if event["choices"] else []
            if new and ttft is None:
                ttft = time.perf_counter() - start
            tokens.extend(new)
    return _Outcome(k, label, tokens, 200, ttft)


async def _client(url: str, config: SoakConfig, prompts: list[list[int]]) -> list[_Outcome]:
    rng = random.Random(config.seed + 1)
    gate = asyncio.Semaphore(config.concurrency)
    hang = _HangReport()
    limits = httpx.Limits(max_connections=4 * config.concurrency)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S)
    async with httpx.AsyncClient(
        base_url=url, timeout=timeout, trust_env=False, limits=limits
    ) as c:

        async def run(i: int) -> _Outcome:
            k = rng.randrange(len(prompts))
            stream = rng.random() < config.stream_fraction
            cancel_after = rng.uniform(0.0, 0.15) if rng.random() < config.abort_fraction else None
            label = f"#{i} (prompt {k}, {'streamed' if stream else 'plain'})"
            body = {
                "prompt": prompts[k],
                "max_tokens": config.max_tokens,
                "temperature": 0,
                "ignore_eos": True,
                "stream": stream,
            }
            async with gate:
                if cancel_after is None:
                    return await _one(c, k, label, body, hang)
                try:
                    return await asyncio.wait_for(_one(c, k, label, body, hang), cancel_after)
                except TimeoutError:  # the client gives up and closes its connection
                    return _Outcome(k, label + " cancelled", None, None, None)

        return await asyncio.gather(*(run(i) for i in range(config.requests)))


def _monolithic(config: SoakConfig, prompts: list[list[int]]) -> tuple[list[list[int]], float]:
    """Expected greedy tokens per prompt, and the monolithic engine's requests/s on them."""
    with LLMEngine(EngineConfig(**_engine_kwargs(config), num_gpu_blocks=512)) as engine:
        engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2))  # warm-up, not timed
        start = time.perf_counter()
        outs = engine.generate(
            prompts, SamplingParams(max_tokens=config.max_tokens, ignore_eos=True)
        )
        return [o.token_ids for o in outs], len(prompts) / (time.perf_counter() - start)


def _audit_idle(role: str, parts: ServerParts, base: EngineBaseline, timeout_s: float) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while parts.loop.call(lambda e: e.has_unfinished_requests() or e.has_pending_transfers()):
        if time.monotonic() > deadline:
            break  # idle_problems names what is left
        time.sleep(0.05)
    return [f"{role}: {p}" for p in parts.loop.call(lambda e: idle_problems(e, base))]


def _counters(role: str, parts: ServerParts) -> dict[str, float]:
    """The counters that show which paths the soak took."""
    out: dict[str, float] = {}
    for family in parts.metrics.registry.collect():
        for s in family.samples:
            name = s.name.removeprefix("kvbridge:").removesuffix("_total")
            if name in _COUNTERS and s.value:
                label = s.labels.get("source") or s.labels.get("transfer_type")
                out[f"{role} {name}" + (f" ({label})" if label else "")] = s.value
    return out


def run_soak(config: SoakConfig) -> SoakResult:
    """Run the soak and audit the aftermath (see the module docstring)."""
    prompts = make_prompts(config)
    expected, baseline_rps = _monolithic(config, prompts)
    audit = LogAudit()
    # uvicorn's loggers do not propagate, and each server's config resets their handlers:
    # watch them once every server is configured.
    watched = [logging.getLogger(), logging.getLogger("uvicorn")]
    servers: list[BackgroundServer] = []
    engines: dict[str, tuple[ServerParts, EngineBaseline]] = {}
    leaks: list[str] = []
    counters: dict[str, float] = {}
    try:
        for role in ("producer", "consumer"):
            serve = ServeConfig(
                **_engine_kwargs(config),
                num_gpu_blocks=config.gpu_blocks,
                kv_transfer_config=_transfer_config(f"kv_{role}", config),
            )
            parts = build_server(serve)
            servers.append(BackgroundServer(parts.app).start())
            engines[role] = (parts, parts.loop.call(engine_baseline))
        proxy = BackgroundServer(build_proxy_app([servers[0].url], [servers[1].url])).start()
        servers.append(proxy)
        for log in watched:
            log.addHandler(audit)
        start = time.perf_counter()
        outcomes = asyncio.run(_client(proxy.url, config, prompts))
        wall = time.perf_counter() - start
        for role, (parts, base) in engines.items():
            leaks += _audit_idle(role, parts, base, timeout_s=config.lease_s + 10)
            counters.update(_counters(role, parts))
    finally:
        for server in reversed(servers):
            server.stop()
        for log in watched:
            log.removeHandler(audit)
    for role, (parts, _) in engines.items():
        for part in connector_parts(parts.loop.engine):
            if isinstance(part, NixlWorker) and part.leaked != LiveCounts(0, 0, 0, 0):
                leaks.append(f"{role}: NIXL transport held {part.leaked} at shutdown")
    done = [o for o in outcomes if o.tokens is not None]
    return SoakResult(
        requests=config.requests,
        completed=len(done),
        aborted=sum(1 for o in outcomes if o.status is None),
        wall_s=wall,
        ttft_s=[o.ttft for o in done if o.ttft is not None],
        baseline_rps=baseline_rps,
        mismatched=[o.label for o in done if o.tokens != expected[o.prompt]],
        bad_status=[
            o.label if o.status == NO_ANSWER else f"{o.label}: HTTP {o.status}"
            for o in outcomes
            if o.tokens is None and o.status is not None
        ],
        leaks=leaks,
        unexpected_logs=audit.unexpected(),
        lapsed_leases=audit.count(EXPECTED_WARNINGS[1]),
        counters=counters,
    )


# -- command line ---------------------------------------------------------------------------------
def _parse(argv: list[str] | None) -> SoakConfig:
    p = argparse.ArgumentParser(prog="kvbridge bench soak", description=__doc__)
    for f in fields(SoakConfig):
        kind = int if f.type == "int" else float
        p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default)
    try:
        return SoakConfig(**vars(p.parse_args(argv)))
    except ValueError as e:
        p.error(str(e))
        raise


def _table(config: SoakConfig, r: SoakResult) -> Table:
    table = Table(
        title=f"soak: proxy + P + D (tiny model, CPU), {r.requests} requests, "
        f"{config.concurrency} in flight, {config.abort_fraction:.0%} cancelled"
    )
    table.add_column("measure")
    table.add_column("value", justify="right")
    p50, p99 = r.ttft_percentile(0.5) * 1e3, r.ttft_percentile(0.99) * 1e3
    rows = [
        ("completed / cancelled by the client", f"{r.completed} / {r.aborted}"),
        ("requests/s through proxy + P + D", f"{r.requests_per_s:.1f}"),
        ("baseline: monolithic engine, in-process, requests/s", f"{r.baseline_rps:.1f}"),
        ("TTFT p50 / p99, streamed, ms", f"{p50:.0f} / {p99:.0f}"),
        ("completed with tokens != monolithic", str(len(r.mismatched))),
        ("unexpected HTTP answers", str(len(r.bad_status))),
        ("leaks after the run", str(len(r.leaks))),
        ("log lines at ERROR, or an unexpected WARNING", str(len(r.unexpected_logs))),
        ("leases that lapsed (client gone early)", str(r.lapsed_leases)),
        *((key, f"{value:,.0f}") for key, value in sorted(r.counters.items())),
    ]
    for row in rows:
        table.add_row(*row)
    return table


def main(argv: list[str] | None = None) -> int:
    config = _parse(argv)
    try:
        result = run_soak(config)
    except ImportError as e:
        print(f"kvbridge bench soak: needs the NIXL package ({e})")
        return 2
    Console().print(_table(config, result))
    for line in result.problems[:20]:
        print(f"  problem: {line}")
    return 0 if not result.problems else 1
