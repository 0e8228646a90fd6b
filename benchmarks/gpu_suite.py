"""The whole GPU suite in one run: ``python -m benchmarks.gpu_suite``, one table per part.

Parts (each against a baseline measured in the same run):
1. ``offload``: the copy engine, every strategy, GB/s vs blocks per step, vs the pinned-copy
   ceiling (``kvbridge bench offload``);
2. ``ttft``: a prompt recomputed vs reloaded from the CPU tier, Llama-3-8B shapes, and decode
   tokens/s on the same engine (``benchmarks.ttft``);
3. ``nixl``: NIXL P/D transfer, direct VRAM reads vs the host-staged mode
   (``benchmarks.nixl_modes``).
Results go to ``--out`` (default ``$OUT`` or ``./gpu-suite``): ``results.json`` (rewritten after
each part), ``offload.png``, ``ttft.png``.
"""

from __future__ import annotations

import argparse
import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import nixl_modes, ttft
from kvbridge.bench import harness
from kvbridge.bench import offload as offload_bench

PARTS = ("offload", "ttft", "nixl")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = harness.parser("python -m benchmarks.gpu_suite", __doc__)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-suite")))
    p.add_argument("--parts", type=harness.subset(PARTS), default=list(PARTS))
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="llama3.1-8b", help="Llama-3-8B shapes, 128k context")
    p.add_argument("--prompt-lens", default="2048,8192,32768")
    p.add_argument("--blocks", default="64,256,1024,4096", help="offload blocks per step")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--load-modes", default="async,layerwise", help="CPU-tier load modes (ttft)")
    p.add_argument("--nixl-args", default="", help="extra arguments for benchmarks.nixl_modes")
    args = p.parse_args(argv)
    args.json = args.json or args.out / "results.json"
    return args


def run_offload(args: argparse.Namespace) -> harness.Report:
    argv = ["--device", args.device, "--blocks", *args.blocks.split(",")]
    if args.device != "cpu":
        argv += ["--strategy", "all"]
    bench_args = offload_bench._parse(argv)
    rows: list[offload_bench.Row] = []
    try:
        offload_bench.run(bench_args, rows)
    finally:  # the rows measured before a failure still count
        report = offload_bench.report(bench_args, rows)
    return report


def run_ttft(args: argparse.Namespace) -> harness.Report:
    argv = ["--model", args.model, "--device", args.device, "--prompt-lens", args.prompt_lens]
    argv += ["--load-modes", args.load_modes]
    bench_args = ttft.parse_args([*argv, "--decode-tokens", str(args.decode_tokens)])
    return ttft.report(bench_args, ttft.run(bench_args))


def run_nixl(args: argparse.Namespace) -> harness.Report:
    bench_args = nixl_modes.parse_args(["--device", args.device, *args.nixl_args.split()])
    return nixl_modes.report(bench_args, nixl_modes.run(bench_args))


RUNNERS: dict[str, Callable[[argparse.Namespace], harness.Report]] = {
    "offload": run_offload,
    "ttft": run_ttft,
    "nixl": run_nixl,
}


def plot(results: dict[str, list[Any]], out: Path) -> None:
    """``offload.png`` and ``ttft.png`` from the parts' rows (report name -> rows)."""
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
    ttft_rows = results.get("ttft") or []
    if ttft_rows:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        modes = list(dict.fromkeys(r["load_mode"] for r in ttft_rows))
        first = [r for r in ttft_rows if r["load_mode"] == modes[0]]
        lens = [r["prompt_len"] for r in first]
        ax.plot(lens, [r["recompute_ms"] for r in first], marker="o", label="recompute")
        for mode in modes:
            mine = [r for r in ttft_rows if r["load_mode"] == mode]
            lens_m, ms = [r["prompt_len"] for r in mine], [r["reload_ms"] for r in mine]
            ax.plot(lens_m, ms, marker="o", label=f"reload ({mode})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("TTFT (ms)")
        ax.set_title("Time to first token: recompute vs reload")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "ttft.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    console = harness.console()
    reports: list[harness.Report] = []
    failed = []
    for part in args.parts:
        console.rule(part)
        try:
            report = RUNNERS[part](args)
        except Exception:  # one part failing must not hide the others' numbers
            failed.append(part)
            error = traceback.format_exc()
            report = harness.Report(part, f"{part}: FAILED", ("part", "error"))
            report.add([part, error.strip().splitlines()[-1]])
            report.notes.append(error)
        reports.append(report)
        harness.show([report], markdown=args.markdown, out=console)
        harness.save(reports, args, args.json)
    plot({r.name: r.data for r in reports}, args.out)
    console.print(f"results in {args.out}; failed parts: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
