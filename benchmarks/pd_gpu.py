"""Prefill on one GPU, decode on another, against one engine: ``python -m benchmarks.pd_gpu``.

Per NIXL mode (``direct``: both sides ``kv_buffer_device`` cuda; ``staged``: both cpu), three
processes: ``kvbridge serve`` as the prefill engine (kv_producer) on the first GPU and as the
decode engine (kv_consumer) on the second, each with MultiConnector(NixlConnector,
SimpleCPUOffloadConnector) and prefix caching, and ``kvbridge proxy`` in front. A monolithic
``kvbridge serve`` (CPU offload only) on the decode GPU runs beside the first mode's pair.
Each process sees one GPU (``CUDA_VISIBLE_DEVICES``); NVLink multicast is off in all of them.
On a one-GPU machine (``--gpus 0,0``, the default there) all three servers share that GPU.

For each prompt length, fresh random prompts (the same ones in every mode) go to the monolithic
server and through the proxy (P prefills, D reads the KV over NIXL, D decodes). Time to first
token is taken at the client, streaming; D's greedy tokens must equal the monolithic server's
and D must have loaded every prompt token but the last from P. The connector's bytes, READ
time, lease confirmation and stage-in time per request are deltas of D's ``/metrics``; the
prefill round trip is a delta of the proxy's, D's TTFT (arrival to first token in its engine)
a delta of D's; "rest" is what the client waited beyond both (the proxy's hops, HTTP). One
warm-up request per length and path first.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import httpx

from benchmarks.nixl_modes import MODES, visible_gpus
from benchmarks.pd_gpu_client import D_KEYS, Completion, complete, metric_delta, metrics_text
from benchmarks.ucx import read_lanes
from kvbridge.bench import harness
from kvbridge.demo.processes import ProcessSet, ServiceError, ServiceProcess
from kvbridge.demo.stack import BLOCK_SIZE, transfer_config
from kvbridge.engine.loader import read_hf_config
from kvbridge.engine.model_config import NAMED_CONFIGS, ModelConfig

logger = logging.getLogger(__name__)

TTFT_TARGET = 1.2  # disaggregated TTFT within this factor of monolithic (8k prompt)


class Urls(NamedTuple):
    prefill: str
    decode: str
    proxy: str
    mono: str | None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = harness.parser("python -m benchmarks.pd_gpu", __doc__)
    add = p.add_argument
    add("--device", choices=("cuda", "cpu"), default="cuda")
    add("--model", default="llama3.1-8b", help="named config (random weights) or checkpoint dir")
    lens = harness.int_list
    add("--prompt-lens", type=lens, default=[2048, 8192, 32768], help="comma-separated lengths")
    add(
        "--gpus",
        type=lens,
        help="prefill GPU,decode GPU (mono: decode's; default 0,1, or 0,0 on one GPU)",
    )
    modes = harness.subset(MODES)
    add("--modes", type=modes, default=["direct", "staged"], help=f"subset of {','.join(MODES)}")
    add("--repeats", type=int, default=2, help="timed prompts per length (median)")
    add("--max-tokens", type=int, default=16, help="greedy tokens per request")
    add("--seed", type=int, default=0, help="weight seed")
    add("--startup-timeout", type=float, help="seconds for servers to listen (300 cuda, 120 cpu)")
    add("--request-timeout", type=float, default=600.0)
    add("--keep-logs", action="store_true", help="keep the servers' configs and logs")
    args = p.parse_args(argv)
    args.startup_timeout = args.startup_timeout or (300.0 if args.device == "cuda" else 120.0)
    if args.gpus is None:
        args.gpus = [0, 1] if args.device == "cuda" and visible_gpus() >= 2 else [0, 0]
    harness.positive(p, args, "repeats", "max_tokens")
    if len(args.gpus) != 2 or min(args.prompt_lens) < 2:
        p.error("--gpus takes two indices; prompt lengths must be >= 2")
    return args


def preflight(args: argparse.Namespace) -> str | None:
    """Why this machine cannot run the benchmark, or None."""
    missing = [m for m in ("fastapi", "uvicorn", "httpx") if importlib.util.find_spec(m) is None]
    if missing:
        return f"the servers need {', '.join(missing)}: install (or carry wheels of) them"
    try:
        from kvbridge.nixl.wrapper import load_nixl_api

        load_nixl_api()
    except ImportError as e:
        return str(e)
    if args.device == "cuda":
        n = visible_gpus()
        if n < 1:
            return "--device cuda needs a GPU; none visible"
        if not all(0 <= g < n for g in args.gpus):
            return f"--gpus {args.gpus[0]},{args.gpus[1]}: only GPUs 0..{n - 1} are visible"
    return None


def model_config(model: str) -> ModelConfig:
    return NAMED_CONFIGS[model] if model in NAMED_CONFIGS else read_hf_config(model)


# -- servers -------------------------------------------------------------------------------------
def serve_config(args: argparse.Namespace, role: str, buffer: str, blocks: int) -> dict[str, Any]:
    """One ``kvbridge serve --config`` file; role ``monolithic`` has the CPU tier only."""
    transfer: dict[str, Any]
    if role == "monolithic":
        transfer = {
            "kv_connector": "SimpleCPUOffloadConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"num_cpu_blocks": blocks},
        }
    else:
        transfer = transfer_config(role, reuse=True, cpu_blocks=blocks, kv_buffer_device=buffer)
    config = {
        "model": args.model,
        "device": args.device,
        "seed": args.seed,
        "host": "127.0.0.1",
        "port": 0,
        "block_size": BLOCK_SIZE,
        "num_gpu_blocks": blocks,
        "max_num_batched_tokens": max(args.prompt_lens),  # a prompt is one prefill step
        "enable_prefix_caching": True,
        "kv_transfer_config": transfer,
    }
    if args.device == "cuda":
        config["dtype"] = "bfloat16"
    return config


def _start(
    procs: ProcessSet,
    name: str,
    argv: list[str],
    args: argparse.Namespace,
    gpu: int | None,
    extra: dict[str, str] | None = None,
) -> ServiceProcess:
    env = {**os.environ, **harness.child_env(args.device, gpu), **(extra or {})}
    if args.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")  # several servers share the cores
    service = ServiceProcess(name, argv, procs.run_dir / f"{name}.log", env)
    procs.services.append(service)
    service.start()
    return service


def start_servers(
    procs: ProcessSet, args: argparse.Namespace, mode: str, *, with_mono: bool
) -> Urls:
    """Prefill, decode (and the monolithic server) in parallel, then the proxy."""
    blocks = math.ceil((max(args.prompt_lens) + args.max_tokens) / BLOCK_SIZE) + 16
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    p_gpu, d_gpu = args.gpus
    p_buf, d_buf = MODES[mode]
    # short name -> (role, kv_buffer_device, GPU)
    plan = {"prefill": ("kv_producer", p_buf, p_gpu), "decode": ("kv_consumer", d_buf, d_gpu)}
    if with_mono:
        plan["mono"] = ("monolithic", "", d_gpu)
    started = []
    for short, (role, buffer, gpu) in plan.items():
        path = procs.run_dir / f"{mode}-{short}.json"
        path.write_text(json.dumps(serve_config(args, role, buffer, blocks), indent=1))
        argv = _kvbridge(level, "serve", "--config", str(path))
        extra = {"UCX_PROTO_INFO": "y"} if short == "decode" else None  # D's READ lanes
        started.append(_start(procs, f"{mode}-{short}", argv, args, gpu, extra))
    deadline = time.monotonic() + args.startup_timeout
    urls = [s.wait_ready(deadline) for s in started]
    routes = ["--prefill", urls[0], "--decode", urls[1], "--port", "0"]
    proxy_argv = _kvbridge(level, "proxy", *routes, "--timeout", str(args.request_timeout))
    proxy = _start(procs, f"{mode}-proxy", proxy_argv, args, None)
    return Urls(urls[0], urls[1], proxy.wait_ready(deadline), urls[2] if with_mono else None)


def _kvbridge(level: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "kvbridge.cli", "--log-level", level, *args]


# -- measurement ---------------------------------------------------------------------------------
def make_prompts(args: argparse.Namespace, vocab: int) -> dict[int, list[list[int]]]:
    """length -> [warm-up prompt, timed prompts...]; all distinct, the same in every mode."""
    rng = random.Random(args.seed + 1)
    return {
        n: [[rng.randrange(vocab) for _ in range(n)] for _ in range(args.repeats + 1)]
        for n in args.prompt_lens
    }


def run_mode(
    args: argparse.Namespace,
    mode: str,
    prompts: dict[int, list[list[int]]],
    mono: dict[tuple[int, int], tuple[Completion, Completion]],
    procs: ProcessSet,
) -> list[dict[str, Any]]:
    """One mode's servers (and the monolithic one until ``mono`` holds every prompt's answer);
    one row per prompt length."""
    wanted = sum(len(group) for group in prompts.values())
    urls = start_servers(procs, args, mode, with_mono=len(mono) < wanted)
    rows = []
    with httpx.Client(trust_env=False, timeout=httpx.Timeout(args.request_timeout)) as client:
        for n, group in prompts.items():
            samples = []
            for i, prompt in enumerate(group):
                if urls.mono is not None:  # the prompt fresh, then again as a prefix-cache hit
                    first = complete(client, urls.mono, prompt, args.max_tokens)
                    mono[(n, i)] = (first, complete(client, urls.mono, prompt, args.max_tokens))
                before = (metrics_text(client, urls.decode), metrics_text(client, urls.proxy))
                got = complete(client, urls.proxy, prompt, args.max_tokens)
                moved = metric_delta(client, urls, before)
                if i:  # the first of each length warms up
                    samples.append((got, mono[(n, i)], moved))
            procs.check_alive()
            rows.append(_row(mode, n, samples))
    lanes = read_lanes(str(procs.run_dir / f"{mode}-decode.log"))
    for row in rows:
        row["ucx_read_lanes"] = lanes
    return rows


def first_difference(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Index of the first token where ``a`` and ``b`` differ; -1 if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return -1 if len(a) == len(b) else min(len(a), len(b))


def _row(
    mode: str,
    n: int,
    samples: list[tuple[Completion, tuple[Completion, Completion], dict[str, float]]],
) -> dict[str, Any]:
    med = statistics.median
    errors = [c.error for got, refs, _ in samples for c in (got, *refs) if c.error]
    if errors:
        raise RuntimeError(f"{mode}, {n} tokens: request failed: {errors[0]}")
    moved = {k: med(m[k] for _, _, m in samples) for k in D_KEYS}
    d, first, hit = ([c.tokens for c in col] for col in zip(*((g, *r) for g, r, _ in samples)))
    read_s = moved["xfer_s"]
    d_side = read_s + moved["confirm_s"] + moved["stage_in_s"]
    return {
        "mode": mode,
        "prompt_tokens": n,
        "kv_mib": moved["bytes"] / 2**20,
        "ttft_mono_ms": 1e3 * med(ref.ttft_s for _, (ref, _), _ in samples),
        "ttft_disagg_ms": 1e3 * med(got.ttft_s for got, _, _ in samples),
        "prefill_round_trip_ms": 1e3 * moved["prefill_s"],
        "d_ttft_ms": 1e3 * moved["ttft_s"],
        "read_ms": 1e3 * read_s,
        "d_connector_ms": 1e3 * d_side,
        "read_gbps": moved["bytes"] / read_s / 1e9 if read_s > 0 else 0.0,
        "d_connector_gbps": moved["bytes"] / d_side / 1e9 if d_side > 0 else 0.0,
        "descs": moved["descs"],
        # every prompt token: P hands its first token over, D computes that one instead
        "remote_tokens_ok": all(got.external_tokens == n for got, _, _ in samples),
        "same_tokens": sum(a == b for a, b in zip(d, first)),
        "same_as_mono_hit": sum(a == b for a, b in zip(d, hit)),
        "mono_hit_same": sum(a == b for a, b in zip(hit, first)),  # the engine's own stability
        "first_difference": [first_difference(a, b) for a, b in zip(d, first)],
        "compared": len(samples),
        "tokens_per_request": len(first[0]),
        "d_tokens": [list(t) for t in d],
        "mono_tokens": [list(t) for t in first],
        "mono_hit_tokens": [list(t) for t in hit],
    }


# -- report --------------------------------------------------------------------------------------
COLUMNS = (
    *("mode", "prompt", "KV MiB", "TTFT mono ms", "TTFT P/D ms", "P/D / mono"),
    *("P round trip ms", "D TTFT ms", "rest ms", "D READ ms", "D conn ms"),
    *("READ GB/s", "D conn GB/s", "descs", "remote tokens"),
    *("D = mono", "D = mono hit", "mono hit = mono", "UCX READ lanes"),
)


def _cells(r: dict[str, Any]) -> list[str]:
    return [
        r["mode"],
        f"{r['prompt_tokens']:,}",
        f"{r['kv_mib']:.1f}",
        f"{r['ttft_mono_ms']:.1f}",
        f"{r['ttft_disagg_ms']:.1f}",
        f"{r['ttft_disagg_ms'] / r['ttft_mono_ms']:.2f}",
        f"{r['prefill_round_trip_ms']:.1f}",
        f"{r['d_ttft_ms']:.1f}",
        f"{r['ttft_disagg_ms'] - r['prefill_round_trip_ms'] - r['d_ttft_ms']:.1f}",
        f"{r['read_ms']:.1f}",
        f"{r['d_connector_ms']:.1f}",
        f"{r['read_gbps']:.2f}",
        f"{r['d_connector_gbps']:.2f}",
        f"{r['descs']:.0f}",
        "all" if r["remote_tokens_ok"] else "NO",
        f"{r['same_tokens']}/{r['compared']} x {r['tokens_per_request']}",
        f"{r['same_as_mono_hit']}/{r['compared']}",
        f"{r['mono_hit_same']}/{r['compared']}",
        ", ".join(r["ucx_read_lanes"]) or "-",
    ]


def report(
    args: argparse.Namespace, rows: list[dict[str, Any]], notes: list[str]
) -> harness.Report:
    """The table; under it ``notes`` and the verdicts: the 8k TTFT target, tokens equal."""
    where = "CPU" if args.device == "cpu" else f"GPU {args.gpus[0]} -> GPU {args.gpus[1]}"
    title = (
        f"P/D over NIXL vs one engine: {args.model} on {where}; TTFT at the client, "
        f"median of {args.repeats}; connector columns from D's /metrics"
    )
    out = harness.Report("pd-gpu", title, COLUMNS, words=COLUMNS[-1:])
    for r in rows:
        out.add(_cells(r), r)
    out.notes += notes
    for r in rows:
        if r["prompt_tokens"] == 8192:
            ratio = r["ttft_disagg_ms"] / r["ttft_mono_ms"]
            verdict = "met" if ratio <= TTFT_TARGET else "MISSED"
            line = f"{r['mode']}: 8k P/D TTFT within {TTFT_TARGET}x of monolithic: {verdict}"
            out.notes.append(f"{line} ({ratio:.2f}x)")
    out.notes.append(f"D's tokens equal the monolithic engine's, KV read from P: {tokens_ok(rows)}")
    agree = modes_agree(rows)
    if agree is not None:
        out.notes.append(f"D's tokens equal across modes (same KV bytes): {agree}")
    return out


def tokens_ok(rows: list[dict[str, Any]]) -> bool:
    """D loaded every prompt token but the last from P and gave the monolithic engine's tokens."""
    return bool(rows) and all(
        r["remote_tokens_ok"] and r["same_tokens"] == r["compared"] for r in rows
    )


def modes_agree(rows: list[dict[str, Any]]) -> bool | None:
    """Whether D gave the same tokens for each prompt in every mode (None: one mode only)."""
    by_len: dict[int, list[list[list[int]]]] = {}
    for r in rows:
        by_len.setdefault(r["prompt_tokens"], []).append(r["d_tokens"])
    if all(len(runs) < 2 for runs in by_len.values()):
        return None
    return all(all(run == runs[0] for run in runs) for runs in by_len.values())


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    """Every mode in turn; (rows, notes: prompt lengths skipped, modes that failed)."""
    model = model_config(args.model)
    limit = model.max_position_embeddings
    notes = [
        f"skipped {n} tokens: {args.model} holds {limit} positions"
        for n in args.prompt_lens
        if n > limit
    ]
    args.prompt_lens = [n for n in args.prompt_lens if n <= limit]
    if not args.prompt_lens:
        raise ValueError(f"--prompt-lens: every length exceeds {args.model}'s {limit} positions")
    prompts = make_prompts(args, model.vocab_size)
    mono: dict[tuple[int, int], tuple[Completion, Completion]] = {}
    run_dir = Path(tempfile.mkdtemp(prefix="kvbridge-pd-gpu-"))
    rows: list[dict[str, Any]] = []
    for mode in args.modes:
        try:
            with ProcessSet(run_dir) as procs:
                rows += run_mode(args, mode, prompts, mono, procs)
        except (ServiceError, RuntimeError, OSError, httpx.HTTPError) as e:
            logger.debug("mode %s failed", mode, exc_info=True)
            notes.append(f"FAILED {mode}: {type(e).__name__}: {e}")
    if args.keep_logs or any(n.startswith("FAILED") for n in notes):
        notes.append(f"configs and logs: {run_dir}")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    return rows, notes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = preflight(args)
    if problem is not None:
        print(f"pd_gpu: {problem}", file=sys.stderr)
        return 2
    try:
        rows, notes = run(args)
    except (ValueError, OSError) as e:
        print(f"pd_gpu: error: {e}", file=sys.stderr)
        return 1
    harness.emit([report(args, rows, notes)], args)
    return 0 if tokens_ok(rows) and not any(n.startswith("FAILED") for n in notes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
