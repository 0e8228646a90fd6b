"""``kvbridge bench gpu``: the whole GPU suite in one run, one table per part, plots and JSON.

Parts (each against a baseline measured in the same run):
1. offload copy engine, every strategy, GB/s vs blocks per step, vs the pinned-copy ceiling;
2. TTFT of a prompt recomputed vs reloaded from the CPU tier, Llama-3-8B shapes, and decode
   tokens/s on the same engine;
3. NIXL P/D transfer, direct VRAM reads vs the host-staged mode (``kvbridge bench nixl-modes``).
Results go to ``--out`` (default ``$OUT`` or ``./gpu-suite``): ``results.json``, ``offload.png``,
``ttft.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
import traceback
from pathlib import Path
from typing import Any

from rich.console import Console

from kvbridge.bench import offload as offload_bench
from kvbridge.bench import ttft as ttft_bench

PARTS = ("offload", "ttft", "nixl")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvbridge bench gpu", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "gpu-suite"))
    p.add_argument("--parts", default=",".join(PARTS), help=f"subset of {','.join(PARTS)}")
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="llama3.1-8b", help="Llama-3-8B shapes, 128k context")
    p.add_argument("--prompt-lens", default="2048,8192,32768")
    p.add_argument("--blocks", default="64,256,1024,4096", help="offload blocks per step")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--nixl-args", default="", help="extra arguments for `bench nixl-modes`")
    return p.parse_args(argv)


def run_offload(args: argparse.Namespace, console: Console) -> list[dict[str, Any]]:
    argv = ["--device", args.device, "--blocks", *args.blocks.split(",")]
    if args.device != "cpu":
        argv += ["--strategy", "all"]
    bench_args = offload_bench._parse(argv)
    rows: list[offload_bench.Row] = []
    try:
        offload_bench.run(bench_args, rows)
    finally:
        console.print(offload_bench._table(bench_args, rows))
    return [r._asdict() for r in rows]


def run_ttft(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    bench_args = ttft_bench._parse(
        ["--model", args.model, "--device", args.device, "--prompt-lens", args.prompt_lens]
    )
    rng = random.Random(0)
    lengths = [int(n) for n in args.prompt_lens.split(",")]
    start = time.perf_counter()
    with ttft_bench.build_engine(bench_args, max(lengths)) as engine:
        init_s = time.perf_counter() - start
        warm = [rng.randrange(engine.model_config.vocab_size) for _ in range(64)]
        for _ in range(2):
            ttft_bench._run(engine, warm)
            ttft_bench._drop_gpu_cache(engine)
        rows = [ttft_bench.measure(engine, bench_args, n, rng) for n in lengths]
        decode = ttft_bench.measure_decode(engine, min(lengths), args.decode_tokens, rng)
    console.print(ttft_bench.table(rows, f"TTFT recompute vs CPU reload, {args.model}"))
    console.print(f"decode, batch 1 after a {min(lengths)}-token prompt: {decode:.1f} tokens/s")
    return {
        "rows": [{**r._asdict(), "speedup": r.speedup} for r in rows],
        "decode_tokens_per_s": decode,
        "model_init_s": init_s,
    }


def run_nixl(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from kvbridge.bench import nixl_modes

    bench_args = nixl_modes.parse_args(["--device", args.device, *args.nixl_args.split()])
    rows = nixl_modes.run(bench_args)
    ok = nixl_modes.report(console, bench_args, rows)
    return {"rows": rows, "correct": ok, "title": nixl_modes.title(bench_args)}


def plot(results: dict[str, Any], out: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results.get("offload") or []
    if rows:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        series: dict[tuple[str, str], list[tuple[int, float]]] = {}
        ceiling: dict[str, list[tuple[int, float]]] = {}
        for r in rows:
            if r["backend_s"] is None:
                continue
            gbps = r["nbytes"] / r["backend_s"] / 1e9
            series.setdefault((r["strategy"], r["direction"]), []).append((r["blocks"], gbps))
            if r["baseline_s"]:
                ceiling.setdefault(r["direction"], []).append(
                    (r["blocks"], r["nbytes"] / r["baseline_s"] / 1e9)
                )
        for (strategy, direction), pts in sorted(series.items()):
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, marker="o", label=f"{strategy} {direction}")
        for direction, cpts in sorted(ceiling.items()):
            by_x: dict[int, list[float]] = {}
            for x, y in cpts:  # one ceiling per strategy run: show their mean
                by_x.setdefault(x, []).append(y)
            cx = sorted(by_x)
            cy = [sum(by_x[x]) / len(by_x[x]) for x in cx]
            style = ":" if direction.startswith("load") else "--"
            ax.plot(cx, cy, linestyle=style, color="gray", label=f"ceiling {direction}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("blocks per step (32 layers x 64 KiB each)")
        ax.set_ylabel("GB/s")
        ax.set_title("CPU offload copy throughput vs blocks per step")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "offload.png", dpi=120)
    ttft = results.get("ttft")
    if ttft and "rows" in ttft:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        lens = [r["prompt_len"] for r in ttft["rows"]]
        ax.plot(lens, [r["recompute_ms"] for r in ttft["rows"]], marker="o", label="recompute")
        ax.plot(lens, [r["reload_ms"] for r in ttft["rows"]], marker="o", label="CPU-tier reload")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("TTFT (ms)")
        ax.set_title("Time to first token: recompute vs reload")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "ttft.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    console = Console(width=150)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runners = {"offload": run_offload, "ttft": run_ttft, "nixl": run_nixl}
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "args": vars(args)}
    failed = []
    for part in args.parts.split(","):
        console.rule(part)
        try:
            results[part] = runners[part](args, console)
        except Exception:  # one part failing must not hide the others' numbers
            failed.append(part)
            results[part] = {"error": traceback.format_exc()}
            console.print(traceback.format_exc())
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    plot(results, out)
    console.print(f"results in {out}; failed parts: {failed or 'none'}")
    return 1 if failed else 0
