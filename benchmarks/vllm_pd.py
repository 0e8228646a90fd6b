"""P/D head to head inside real vLLM: vLLM's own NixlConnector vs kvbridge's (issue #14, test 4).

Same vLLM, same machine, same prompts, the same ``kvbridge proxy`` in front. Per stack: a prefill
(P) and a decode (D) ``vllm serve`` process with the README's CPU settings and the proxy. One
stack is up at a time (each NIXL agent's progress thread keeps a core busy, so two stacks up at
once would share the machine with each other's), in the order A B B A ... over ``--rounds``, so
drift in whatever else runs on the machine hits both alike. Each run: ``--warmup`` requests
(the first pays the NIXL handshake), then ``--requests`` distinct random-token prompts, one at
a time; the same prompts in every run.

Measured per request:

- TTFT: at the client, through the proxy, streaming: request sent -> first SSE chunk with a
  token (P's prefill, D's KV load and first step, three HTTP hops).
- P round trip: the proxy's own timing of the prefill request to P (``max_tokens`` 1), from
  its ``kvbridge:proxy_prefill_seconds``.
- D load time: vLLM's own queue time on D (``vllm:request_queue_time_seconds``: arrival ->
  first scheduled to run). D schedules a P/D request to run only once its KV has arrived, so
  with one request in flight this is the connector's load as the engine sees it: the READ, and
  the steps until the engine learns it finished. One yardstick for both connectors.
- READ time: each connector's own transfer timing (vLLM: ``vllm:nixl_xfer_time_seconds``,
  kvbridge: ``kvbridge:xfer_time_seconds``), post to completion seen; mean over the run.

Usage: ``python -m benchmarks.vllm_pd [--requests 30] [--json out.json]`` from the repository
root (writes the tiny checkpoint of examples/vllm/tiny_checkpoint.py unless ``--model DIR``);
``--json`` saves the summary rows and every raw sample.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from kvbridge.bench import harness
from kvbridge.demo.processes import stop_group

REPO = Path(__file__).resolve().parents[1]
CPU_ARGS = "--block-size 32 --enforce-eager --max-model-len 512"
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
STACKS = ("vllm", "kvbridge")
LABELS = {"vllm": "vLLM NixlConnector", "kvbridge": "kvbridge NixlConnector"}
READ_METRIC = {"vllm": "vllm:nixl_xfer_time_seconds", "kvbridge": "kvbridge:xfer_time_seconds"}


def kv_configs(stack: str, side_channel_port: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(P's, D's) ``--kv-transfer-config`` of a stack."""
    if stack == "vllm":  # side channel port: VLLM_NIXL_SIDE_CHANNEL_PORT, per process
        base: dict[str, Any] = {"kv_connector": "NixlConnector", "kv_buffer_device": "cpu"}
        p_extra: dict[str, Any] = {}
    else:
        base = {
            "kv_connector": "KVBridgeNixlConnector",
            "kv_connector_module_path": "kvbridge.vllm",
        }
        p_extra = {"kv_connector_extra_config": {"side_channel_port": side_channel_port}}
    p = {**base, "kv_role": "kv_producer", **p_extra}
    d = {**base, "kv_role": "kv_consumer", "kv_load_failure_policy": "recompute"}
    return p, d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def process(cmd: list[str], log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """A process in its own group; the whole group is stopped on exit."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        stop_group(proc, 15.0, 5.0)


def wait_ready(client: httpx.Client, procs: list[tuple[subprocess.Popen[bytes], str]]) -> None:
    deadline = time.monotonic() + 600
    for proc, url in procs:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{url}: server exited ({proc.returncode}); see its log")
            try:
                if client.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url}: not ready in 600 s")
            time.sleep(0.25)


_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$")


def metrics(client: httpx.Client, url: str) -> dict[str, float]:
    """Sums of every series of ``url``/metrics by name (labels folded)."""
    out: dict[str, float] = {}
    for line in client.get(url + "/metrics").text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            key = m.group(1)
            if key == "vllm:prompt_tokens_by_source_total" and m.group(2):
                key += "/" + re.search(r'source="(\w+)"', m.group(2)).group(1)  # type: ignore[union-attr]
            out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def stream_once(
    client: httpx.Client, url: str, prompt: list[int], max_tokens: int
) -> tuple[float, str]:
    """(TTFT in seconds, the answer's text) of one streamed completion through ``url``."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    start, ttft, text = time.perf_counter(), None, []
    with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"proxy answered {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or []
            if choices:
                ttft = time.perf_counter() - start if ttft is None else ttft
                text.append(choices[0].get("text") or "")
    if ttft is None:
        raise RuntimeError("the stream carried no token")
    return ttft, "".join(text)


@dataclass
class Stack:
    """One running P/D stack: its D (for metrics) and its proxy (for requests)."""

    name: str
    d_url: str
    proxy_url: str
    ttft_s: list[float] = field(default_factory=list)
    d_load_s: list[float] = field(default_factory=list)
    p_round_trip_s: list[float] = field(default_factory=list)
    external_tokens: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    cold_ttft_s: list[float] = field(default_factory=list)


def start_stack(
    ctx: ExitStack, name: str, model: Path, args: argparse.Namespace, logs: Path
) -> tuple[Stack, list[tuple[subprocess.Popen[bytes], str]]]:
    """Launch P, D and the proxy of one stack (stopped when ``ctx`` closes); returns the stack
    and its processes with their URLs, to wait for."""
    logs.mkdir(parents=True, exist_ok=True)
    ports = {k: free_port() for k in ("p", "d", "proxy", "p_side", "d_side")}
    p_cfg, d_cfg = kv_configs(name, ports["p_side"])
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1", **CPU_ENV}
    base_env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), base_env["PATH"]))
    serve = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
             "--host", "127.0.0.1", *args.vllm_args.split()]  # fmt: skip
    procs = []
    for role, cfg in (("p", p_cfg), ("d", d_cfg)):
        env = {**base_env, "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
               "VLLM_NIXL_SIDE_CHANNEL_PORT": str(ports[f"{role}_side"])}  # fmt: skip
        cmd = [*serve, "--port", str(ports[role]), "--kv-transfer-config", json.dumps(cfg)]
        proc = ctx.enter_context(process(cmd, logs / f"{name}-{role}.log", env))
        procs.append((proc, f"http://127.0.0.1:{ports[role]}"))
    proxy_url = f"http://127.0.0.1:{ports['proxy']}"
    proxy_cmd = [sys.executable, "-m", "kvbridge.cli", "proxy", "--prefill", procs[0][1],
                 "--decode", procs[1][1], "--port", str(ports["proxy"])]  # fmt: skip
    proxy = ctx.enter_context(process(proxy_cmd, logs / f"{name}-proxy.log", base_env))
    return Stack(name, procs[1][1], proxy_url), [*procs, (proxy, proxy_url)]


def measure(client: httpx.Client, stack: Stack, prompt: list[int], max_tokens: int) -> None:
    """One streamed request through ``stack``'s proxy; appends its samples to ``stack``."""
    before, proxy_before = metrics(client, stack.d_url), metrics(client, stack.proxy_url)
    ttft, text = stream_once(client, stack.proxy_url, prompt, max_tokens)
    after, proxy_after = _settled(client, stack.d_url, before), metrics(client, stack.proxy_url)
    stack.p_round_trip_s.append(_d(proxy_after, proxy_before, "kvbridge:proxy_prefill_seconds_sum"))
    stack.ttft_s.append(ttft)
    stack.texts.append(text)
    stack.d_load_s.append(_d(after, before, "vllm:request_queue_time_seconds_sum"))
    stack.external_tokens.append(
        _d(after, before, "vllm:prompt_tokens_by_source_total/external_kv_transfer")
    )


def run(
    model: Path, prompts: list[list[int]], args: argparse.Namespace, logs: Path
) -> dict[str, dict[str, Any]]:
    """One stack up at a time, in the order A B B A ... (``--rounds``), every prompt each time."""
    order = [STACKS if r % 2 == 0 else STACKS[::-1] for r in range(args.rounds)]
    samples = {name: Stack(name, "", "") for name in STACKS}
    reads = {name: [0.0, 0.0] for name in STACKS}  # READ count, READ seconds
    client = httpx.Client(timeout=300, trust_env=False)
    with client:
        for r, names in enumerate(order):
            for name in names:
                with ExitStack() as ctx:
                    t0 = time.monotonic()
                    stack, procs = start_stack(ctx, name, model, args, logs / f"round{r}")
                    wait_ready(client, procs)
                    print(f"round {r}: {LABELS[name]} up in {time.monotonic() - t0:.0f} s",
                          file=sys.stderr)  # fmt: skip
                    warm = random.Random(f"warmup-{r}")
                    for i in range(args.warmup):  # the first pays the NIXL handshake
                        prompt = [warm.randrange(3, 500) for _ in range(args.prompt_tokens)]
                        start = time.perf_counter()
                        stream_once(client, stack.proxy_url, prompt, args.max_tokens)
                        if i == 0:
                            samples[name].cold_ttft_s.append(time.perf_counter() - start)
                    before = metrics(client, stack.d_url)
                    for prompt in prompts:
                        measure(client, stack, prompt, args.max_tokens)
                    after = metrics(client, stack.d_url)
                metric = READ_METRIC[name]
                reads[name][0] += _d(after, before, metric + "_count")
                reads[name][1] += _d(after, before, metric + "_sum")
                for key in ("ttft_s", "d_load_s", "p_round_trip_s", "external_tokens", "texts"):
                    getattr(samples[name], key).extend(getattr(stack, key))
    return {
        name: {
            **{k: v for k, v in vars(st).items() if k not in ("name", "d_url", "proxy_url")},
            "reads": reads[name][0],
            "read_mean_s": reads[name][1] / reads[name][0] if reads[name][0] else None,
        }
        for name, st in samples.items()
    }


def _d(after: dict[str, float], before: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def _settled(client: httpx.Client, url: str, before: dict[str, float]) -> dict[str, float]:
    """D's metrics once the request's queue time is recorded (just after the answer)."""
    key, deadline = "vllm:request_queue_time_seconds_count", time.monotonic() + 10
    while True:
        after = metrics(client, url)
        if _d(after, before, key) >= 1 or time.monotonic() > deadline:
            return after
        time.sleep(0.05)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(r: dict[str, Any]) -> dict[str, float | None]:
    read = r["read_mean_s"]
    return {
        "TTFT p50 (ms)": 1e3 * pct(r["ttft_s"], 0.5),
        "TTFT p95 (ms)": 1e3 * pct(r["ttft_s"], 0.95),
        "P round trip p50 (ms)": 1e3 * pct(r["p_round_trip_s"], 0.5),
        "D load p50 (ms)": 1e3 * pct(r["d_load_s"], 0.5),
        "D load p95 (ms)": 1e3 * pct(r["d_load_s"], 0.95),
        "D load mean (ms)": 1e3 * statistics.fmean(r["d_load_s"]),
        "READ mean, own stats (ms)": None if read is None else 1e3 * read,
        "first request TTFT, mean of runs (ms)": 1e3 * statistics.fmean(r["cold_ttft_s"]),
        "prompt tokens read from P (mean)": statistics.fmean(r["external_tokens"]),
    }


def report(head: str, results: dict[str, dict[str, Any]]) -> harness.Report:
    """The two stacks side by side, a row per measure, with kvbridge/vLLM ratios; the raw
    samples go to the JSON."""
    columns = ("measure", LABELS["vllm"], LABELS["kvbridge"], "kvbridge/vLLM")
    out = harness.Report("vllm-pd", head, columns)
    a, b = (summary(results[s]) for s in STACKS)
    for key in a:
        x, y = a[key], b[key]
        ratio = f"{y / x:.2f}x" if x and y is not None else "-"
        out.add([key, _fmt(x), _fmt(y), ratio], {"measure": key, "vllm": x, "kvbridge": y})
    texts = [results[s]["texts"] for s in STACKS]
    same, n = sum(p == q for p, q in zip(*texts)), len(texts[0])
    out.notes.append(f"answers identical: {same}/{n}")
    out.samples = results
    return out


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = harness.parser("python -m benchmarks.vllm_pd", __doc__)
    ap.add_argument("--model", type=Path, help="checkpoint dir (default: a fresh tiny Llama)")
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=384)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2, help="stack runs each (order A B B A)")
    ap.add_argument("--vllm-args", default=CPU_ARGS, help=f"extra vllm serve args ({CPU_ARGS})")
    ap.add_argument("--logs", type=Path, help="keep the servers' logs here")
    args = ap.parse_args(argv)
    harness.positive(ap, args, "warmup", "requests", "rounds")
    logs = args.logs or Path(tempfile.mkdtemp(prefix="vllm-pd-bench-"))
    logs.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        model = logs / "tiny-llama"
        subprocess.run(
            [sys.executable, str(REPO / "examples/vllm/tiny_checkpoint.py"), str(model)],
            check=True,
            capture_output=True,
        )
    rng = random.Random(0)
    prompts = [
        [rng.randrange(3, 500) for _ in range(args.prompt_tokens)] for _ in range(args.requests)
    ]
    results = run(model, prompts, args, logs)
    import vllm

    head = (
        f"vLLM P/D head to head, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"{platform.node()} ({os.cpu_count()} CPUs), vLLM {vllm.__version__}: "
        f"{args.requests} streamed requests of {args.prompt_tokens} prompt tokens per stack and "
        f"round, max_tokens {args.max_tokens}, one at a time through kvbridge proxy; "
        f"{args.rounds} rounds, one stack up at a time, order A B B A"
    )
    harness.emit([report(head, results)], args)
    print(f"logs: {logs}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
