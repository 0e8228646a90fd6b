"""``kvbridge demo``: a prefill server, a decode server and the proxy as local processes, a
multi-turn workload with shared prefixes through them, outputs checked against a monolithic
engine by the logprob oracle (``kvbridge.oracle``), and a report of what was reused and moved."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import FrameType

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kvbridge.config import ConfigError
from kvbridge.demo.processes import ProcessSet, ServiceError
from kvbridge.demo.reference import compare, reference_outputs
from kvbridge.demo.report import RunSummary, fetch_metrics, render_report
from kvbridge.demo.stack import BLOCK_SIZE, DiskTierPlan, StackPlan, StackSizes, start_stack
from kvbridge.demo.workload import PromptBuilder, WorkloadRunner, WorkloadSpec, warm_up
from kvbridge.oracle import TOLERANCE

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 90.0
REQUEST_TIMEOUT_S = 120.0
EPILOG = """\
Runs everything on this machine: `kvbridge serve` twice (prefill with kv_producer, decode with
kv_consumer, both MultiConnector = NixlConnector + SimpleCPUOffloadConnector) and `kvbridge
proxy`, on free 127.0.0.1 ports. Then the same workload once more on a stack without reuse
(NIXL only, no prefix cache) for comparison. Exit code 0 only if every answer equals the
monolithic engine's, token by token and logprob by logprob (within the oracle's tolerance).
Example config files for running the stack by hand: examples/."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvbridge demo",
        description="P/D demo: prefill + decode servers (NIXL + CPU offload) + proxy;\n"
        "every answer is checked against a monolithic engine.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = p.add_argument
    add("--model", metavar="NAME|PATH",
        help="named config or HF checkpoint dir (default small; llama3-1b on cuda, where "
        "small's compute is too cheap for reuse to show)")  # fmt: skip
    add("--device", default="cpu", choices=("cpu", "cuda"), help="cpu (default) or cuda")
    add("--users", type=int, default=4, metavar="N", help="concurrent users (default 4)")
    add("--turns", type=int, default=3, metavar="N", help="turns per user (default 3)")
    add("--requests", type=int, metavar="N", help="total requests (overrides --turns)")
    add("--max-tokens", type=int, default=16, metavar="N", help="tokens per answer (16)")
    add("--seed", type=int, default=0, help="weight seed of random models (default 0)")
    add("--disk-tier", metavar="DIR",
        help="add a disk tier behind the CPU tier, records under DIR")  # fmt: skip
    add("--disk-tier-gib", type=float, default=1.0, metavar="GIB",
        help="the disk tier's budget per server (default 1 GiB)")  # fmt: skip
    add("--kv-buffer-device", choices=("cuda", "cpu"),
        help="what NIXL reads: the cache (cuda) or a host mirror (cpu, the default on cuda: "
        "one machine has no GPU-direct lane, UCX reads VRAM over tcp/lo at ~0.5 GB/s)")  # fmt: skip
    add("--no-baseline", action="store_true", help="skip the run without reuse")
    add("--keep-logs", action="store_true", help="keep the servers' configs and logs")
    return p


def device_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill ``--model`` and ``--kv-buffer-device`` for the device: on one GPU the model must be
    big enough for reuse to beat recompute, and NIXL reads a host mirror (no GPU-direct lane)."""
    on_gpu = args.device == "cuda"
    args.model = args.model or ("llama3-1b" if on_gpu else "small")
    args.kv_buffer_device = args.kv_buffer_device or ("cpu" if on_gpu else None)
    return args


def main(argv: list[str] | None = None) -> int:
    args = device_defaults(build_parser().parse_args(sys.argv[1:] if argv is None else argv))
    console = Console(highlight=False)
    try:
        spec = WorkloadSpec.build(
            users=args.users, turns=args.turns, requests=args.requests, max_tokens=args.max_tokens
        )
        builder, limit = _prompt_builder(args.model)
        longest = builder.longest_prompt(spec)
        if longest + spec.max_tokens > limit:
            raise ValueError(
                f"--turns/--max-tokens: the longest prompt may reach {longest} tokens, more than "
                f"{args.model} holds ({limit} positions)"
            )
    except (ValueError, ConfigError) as e:
        print(f"kvbridge demo: error: {e}", file=sys.stderr)
        return 2
    sizes = StackSizes.for_workload(
        longest_prompt=longest,
        shared_prefix=len(builder.system_prompt()),
        max_tokens=spec.max_tokens,
        users=spec.users,
    )
    disk = None
    if args.disk_tier:
        disk = DiskTierPlan(str(Path(args.disk_tier).resolve()), int(args.disk_tier_gib * 2**30))
    common = (args.model, args.device, args.seed, sizes)
    plans = [StackPlan("reuse", True, *common, disk, args.kv_buffer_device)]
    if not args.no_baseline:
        plans.append(StackPlan("baseline", False, *common, None, args.kv_buffer_device))
    run_dir = Path(tempfile.mkdtemp(prefix="kvbridge-demo-"))
    console.print(
        f"kvbridge demo: model {args.model} on {args.device}; {spec.users} users x "
        f"{spec.turns} turn(s) = {spec.requests} requests of up to {spec.max_tokens} tokens, "
        f"one shared system prompt ({len(builder.system_prompt())} tokens). Prefill GPU "
        f"cache {sizes.prefill_gpu_blocks} blocks, CPU tier {sizes.cpu_blocks} blocks "
        f"(of {BLOCK_SIZE} tokens)."
    )
    code = 1
    try:
        with _sigterm_as_interrupt():
            code = _run(console, args, spec, builder, plans, run_dir)
    except KeyboardInterrupt:
        console.print("kvbridge demo: interrupted; all servers stopped.")
        code = 130
    except (ServiceError, OSError, RuntimeError, httpx.HTTPError) as e:
        console.print(f"kvbridge demo: error: {e}", markup=False)
        code = 1
    finally:
        if args.keep_logs or code != 0:
            console.print(f"configs and logs: {run_dir}", markup=False)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
    return code


def _run(
    console: Console,
    args: argparse.Namespace,
    spec: WorkloadSpec,
    builder: PromptBuilder,
    plans: list[StackPlan],
    run_dir: Path,
) -> int:
    env = _child_env(args.device)
    columns = (TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=console) as progress:
        runs = [
            _run_stack(progress, plan, spec, builder, ProcessSet(run_dir, env)) for plan in plans
        ]
        task = progress.add_task("monolithic reference", total=None)
        expected = reference_outputs(
            [r.prompt for run in runs for r in run.records if r.error is None],
            model=args.model,
            device=args.device,
            seed=args.seed,
            max_tokens=spec.max_tokens,
            block_size=BLOCK_SIZE,
            cpu_threads=int(env.get("OMP_NUM_THREADS", "0")) or None,
        )
        progress.update(task, total=1, completed=1)
    total = identical = 0
    worst = 0.0
    for i, run in enumerate(runs):
        verdicts = compare(run.records, expected)
        runs[i] = replace(run, identical=verdicts.identical)
        total, identical = total + len(run.records), identical + verdicts.identical
        worst = max(worst, verdicts.max_abs_diff)
        for m in verdicts.mismatches[:3]:
            r = m.record
            console.print(
                f"{run.label}: user {r.user + 1} turn {r.turn + 1}: oracle mismatch: {m.problem}",
                markup=False,
            )
        if len(verdicts.mismatches) > 3:
            console.print(f"{run.label}: {len(verdicts.mismatches) - 3} more mismatches")
    render_report(console, runs)
    console.print(
        f"outputs identical: {identical}/{total} (tokens and logprobs against the monolithic "
        f"engine, tolerance {TOLERANCE:g}; largest logprob difference {worst:.2g})",
        markup=False,
    )
    return 0 if identical == total and total > 0 else 1


def _run_stack(
    progress: Progress,
    plan: StackPlan,
    spec: WorkloadSpec,
    builder: PromptBuilder,
    procs: ProcessSet,
) -> RunSummary:
    """Start ``plan``'s servers and proxy, run the workload through them, read their metrics,
    stop them all (also on error or Ctrl-C)."""
    task = progress.add_task(f"{plan.name}: start-up", total=spec.requests)
    with procs:
        t0 = time.monotonic()
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        urls = start_stack(procs, plan, timeout_s=STARTUP_TIMEOUT_S, log_level=level)
        progress.console.print(
            f"{plan.name}: prefill {urls.prefill}, decode {urls.decode}, proxy {urls.proxy} "
            f"(up in {time.monotonic() - t0:.1f} s)"
        )
        progress.update(task, description=f"{plan.name}: warm-up")
        warm_s = warm_up(urls.proxy, builder, REQUEST_TIMEOUT_S)
        progress.console.print(f"{plan.name}: one warm-up request ({warm_s:.2f} s), not counted")
        servers = {"prefill": urls.prefill, "decode": urls.decode, "proxy": urls.proxy}

        def scrape() -> dict[str, str]:
            return {name: fetch_metrics(url) for name, url in servers.items()}

        before = scrape()
        progress.update(task, description=f"{plan.name}: requests")
        runner = WorkloadRunner(
            urls.proxy,
            spec,
            builder,
            timeout_s=REQUEST_TIMEOUT_S,
            on_done=lambda _: progress.advance(task),
        )
        t0 = time.monotonic()
        records = asyncio.run(runner.run())
        wall = time.monotonic() - t0
        procs.check_alive()
        summary = RunSummary.collect(
            "P/D + reuse" if plan.reuse else "P/D, no reuse",
            records,
            wall,
            **scrape(),
            before=before,
        )
    progress.update(task, description=f"{plan.name}: done")
    return summary


def _prompt_builder(model: str) -> tuple[PromptBuilder, int]:
    """The server's tokenizer for ``model`` and the model's position limit."""
    from kvbridge.engine.engine import EngineConfig
    from kvbridge.serve.tokenizer import load_tokenizer

    model_config = EngineConfig(model=model).model_config()
    bos = model_config.bos_token_id
    tokenizer = load_tokenizer(model, bos_token_id=bos)
    return PromptBuilder(tokenizer, bos), model_config.max_position_embeddings


def _child_env(device: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if device == "cpu":
        # Two servers and the proxy share the cores: one compute thread each, no oversubscription.
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM to the demo stops the servers the same way Ctrl-C does."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
