"""One request's KV through the NixlConnector, direct vs host-staged, against raw NIXL.

``python -m benchmarks.nixl_modes``: per mode, a producer process and a consumer process
(``nixl_modes_peer``), each a real ``NixlWorker`` on Llama-3-8B-shaped bf16 blocks (8 KV heads,
head dim 128, 16 tokens per block, 64 KiB per block-layer; 8k tokens x 32 layers = 1 GiB by
default). Modes name the two sides'
``kv_buffer_device``: ``direct`` (cuda/cuda: NIXL reads the KV cache where it lives),
``staged`` (cpu/cpu: stage-out to pinned host, DRAM->DRAM READ, stage-in), and the mixed
``staged-p`` (cpu/cuda) and ``staged-d`` (cuda/cpu). On ``--device cpu`` "cuda" means the cache
itself, in DRAM.

Connector time = the producer's stage-out (SendSpec to live lease) + the consumer's load
(``start_load_kv`` to ``finished_recving``: lease gate, READ, lease confirmation, stage-in).
Raw = the same descriptors READ on the same two agents in the same run, nothing around it; loads
and raw READs alternate in A B B A order.
The consumer runs with ``UCX_PROTO_INFO=y``; the lanes UCX chose for READs come from its log.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import statistics
import tempfile
from multiprocessing import Pipe
from pathlib import Path
from typing import Any

from benchmarks.nixl_modes_peer import (
    PHASES,
    TOKENS_PER_BLOCK,
    ConsumerReport,
    Geometry,
    Side,
    consumer_main,
    make_spec,
    producer_main,
)
from benchmarks.ucx import read_lanes
from kvbridge.bench import harness
from kvbridge.nixl import stats as keys

logger = logging.getLogger(__name__)

# mode -> (producer kv_buffer_device, consumer kv_buffer_device)
MODES: dict[str, tuple[str, str]] = {
    "direct": ("cuda", "cuda"),
    "staged": ("cpu", "cpu"),
    "staged-p": ("cpu", "cuda"),
    "staged-d": ("cuda", "cpu"),
}
RATIO_TARGET = 0.9


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = harness.parser("python -m benchmarks.nixl_modes", __doc__)
    add = p.add_argument
    add("--device", choices=("cuda", "cpu"), default="cuda")
    add("--tokens", type=int, help="request tokens (default 8192 on cuda, 1024 on cpu)")
    add("--layers", type=int, help="KV layers (default 32 on cuda, 4 on cpu)")
    modes = harness.subset(MODES)
    add(
        "--modes",
        type=modes,
        help=f"comma-separated subset of {','.join(MODES)} (cpu: direct,staged)",
    )
    add("--iters", type=int, default=3, help="timed loads and raw reads per mode")
    add("--gpus", help="producer,consumer GPU (default 0,1 with two GPUs, else 0,0)")
    add("--run-blocks", type=int, default=0, help="blocks per contiguous run (0: one run)")
    add("--timeout", type=float, default=300.0, help="seconds per mode")
    add("--keep-logs", action="store_true", help="keep the processes' logs")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.tokens = args.tokens or (8192 if cuda else 1024)
    args.layers = args.layers or (32 if cuda else 4)
    args.modes = args.modes or (list(MODES) if cuda else ["direct", "staged"])
    harness.positive(p, args, "tokens", "layers", "iters")
    if args.run_blocks < 0:
        p.error("--run-blocks: must be >= 0")
    args.gpu_pair = None
    return args


def gpu_pair(device: str, gpus: str | None) -> tuple[int, int]:
    """(producer GPU, consumer GPU); ``ValueError`` naming ``--gpus`` if they are not visible."""
    if device != "cuda":
        return (0, 0)
    n = visible_gpus()
    if n < 1:
        raise ValueError("--device cuda: no GPU is visible")
    text = gpus or ("0,1" if n >= 2 else "0,0")
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) < n for p in parts):
        raise ValueError(f"--gpus: expected two GPU indices below {n}, got {text!r}")
    return int(parts[0]), int(parts[1])


def geometry(args: argparse.Namespace) -> Geometry:
    """The request's blocks: ``--run-blocks`` consecutive ids, then one id left out, and so on."""
    n = math.ceil(args.tokens / TOKENS_PER_BLOCK)
    run = args.run_blocks or n
    ids = tuple(b + b // run for b in range(n))
    return Geometry(args.device, args.layers, ids[-1] + 1, ids, args.iters)


def run_mode(args: argparse.Namespace, mode: str, geo: Geometry, logs: Path) -> dict[str, Any]:
    """Both processes of one mode; the consumer's report folded into a table row."""
    p_buf, d_buf = MODES[mode]
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    p_gpu, d_gpu = args.gpu_pair
    p_env = harness.child_env(args.device, p_gpu)
    p_side = Side(p_buf, p_env, str(logs / f"{mode}-producer.log"), level)
    d_env = {**harness.child_env(args.device, d_gpu), "UCX_PROTO_INFO": "y"}
    d_side = Side(d_buf, d_env, str(logs / f"{mode}-consumer.log"), level)
    tails = (p_side.log_path, d_side.log_path)
    p_end, d_end = Pipe()
    report_rx, report_tx = Pipe(duplex=False)
    procs = [
        harness.spawn(producer_main, p_end, geo, p_side),
        harness.spawn(consumer_main, d_end, report_tx, geo, d_side),
    ]
    for end in (p_end, d_end, report_tx):
        end.close()  # only the children hold them: a dead peer reads as EOF at once
    grace = 0.0  # a run that went wrong is killed at once
    try:
        if not report_rx.poll(args.timeout):
            raise TimeoutError(
                f"mode {mode}: no report in {args.timeout:g}s{harness.log_tails(tails)}"
            )
        report = report_rx.recv()
        grace = 15.0
    except EOFError:
        raise RuntimeError(f"mode {mode}: the consumer died{harness.log_tails(tails)}") from None
    finally:
        harness.reap(procs, grace)
    if not isinstance(report, ConsumerReport):
        raise RuntimeError(f"mode {mode} failed:\n{report}{harness.log_tails(tails)}")
    return _row(mode, geo, report, read_lanes(d_side.log_path))


def _row(mode: str, geo: Geometry, r: ConsumerReport, lanes: list[str]) -> dict[str, Any]:
    med = statistics.median
    e2e = med(s.stage_out_s + s.load_s for s in r.loads)
    raw = med(s.seconds for s in r.raws)
    phases = {k: 1e3 * med(s.phases_s.get(k, 0.0) for s in r.loads) for k in PHASES}
    producer, consumer = MODES[mode]
    return {
        "mode": mode,
        "producer_buffer": producer,
        "consumer_buffer": consumer,
        "memory": r.memory,
        "layers": geo.layers,
        "blocks": len(geo.block_ids),
        "nbytes": r.nbytes,
        "descs_connector": r.loads[-1].num_descs,
        "descs_raw": r.raws[-1].num_descs,
        "first_load_ms": 1e3 * (r.first.stage_out_s + r.first.load_s),
        "stage_out_ms": 1e3 * med(s.stage_out_s for s in r.loads),
        "load_ms": 1e3 * med(s.load_s for s in r.loads),
        "post_ms": phases[keys.POST_TIME],
        "read_ms": phases[keys.XFER_TIME],
        "confirm_ms": phases[keys.CONFIRM_TIME],
        "stage_in_ms": phases[keys.STAGE_IN_TIME],
        "e2e_ms": 1e3 * e2e,
        "raw_ms": 1e3 * raw,
        "connector_gbps": r.nbytes / e2e / 1e9,
        "raw_gbps": r.nbytes / raw / 1e9,
        "ratio": raw / e2e,
        "correct": all(s.correct for s in [r.first, *r.loads]) and all(s.correct for s in r.raws),
        "holds_released": r.released,
        "holds": len(r.loads) + 1,
        "ucx_read_lanes": lanes,
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every mode of ``args.modes``, one after the other; one dict per mode."""
    args.gpu_pair = gpu_pair(args.device, args.gpus)
    geo = geometry(args)
    make_spec(geo)  # validates the geometry before any process starts
    from kvbridge.nixl.wrapper import load_nixl_api

    load_nixl_api()  # ImportError naming the package to install
    logs = Path(tempfile.mkdtemp(prefix="kvbridge-nixl-modes-"))
    rows = []
    for mode in args.modes:
        try:
            rows.append(run_mode(args, mode, geo, logs))
        except (RuntimeError, TimeoutError, OSError) as e:  # the other modes still run
            rows.append({"mode": mode, "error": f"{type(e).__name__}: {e}"})
    if args.keep_logs or not all(r.get("correct") for r in rows):
        print(f"nixl-modes logs: {logs}")
    else:
        shutil.rmtree(logs, ignore_errors=True)
    return rows


COLUMNS = (
    "mode",
    "READ moves",
    "MiB",
    "descs conn/raw",
    "P stage-out ms",
    "D load ms (post/READ/confirm/stage-in)",
    "1st load ms",
    "conn GB/s",
    "raw GB/s",
    "ratio",
    "ok",
    "UCX READ lanes",
)


def _cells(r: dict[str, Any]) -> list[str]:
    parts = "/".join(f"{r[k]:.1f}" for k in ("post_ms", "read_ms", "confirm_ms", "stage_in_ms"))
    return [
        r["mode"],
        r["memory"],
        f"{r['nbytes'] / 2**20:.0f}",
        f"{r['descs_connector']}/{r['descs_raw']}",
        f"{r['stage_out_ms']:.1f}",
        f"{r['load_ms']:.1f} ({parts})",
        f"{r['first_load_ms']:.0f}",
        f"{r['connector_gbps']:.2f}",
        f"{r['raw_gbps']:.2f}",
        f"{r['ratio']:.2f}",
        "yes" if r["correct"] else "NO",
        ", ".join(r["ucx_read_lanes"]) or "-",
    ]


def title(args: argparse.Namespace) -> str:
    pair = args.gpu_pair or (0, 0)
    where = "CPU (DRAM)" if args.device == "cpu" else f"GPUs P={pair[0]} D={pair[1]}"
    return (
        f"NixlConnector vs raw NIXL READ, one {args.tokens}-token request ({args.layers} layers "
        f"x 64 KiB block-layers, bf16); P and D in separate processes on {where}; "
        f"median of {args.iters}; raw = same descriptors, same agents; kv_buffer_device P/D: "
        "direct cuda/cuda, staged cpu/cpu, staged-p cpu/cuda, staged-d cuda/cpu"
    )


def summary(all_rows: list[dict[str, Any]]) -> list[str]:
    """Target lines under the table (and the modes that failed)."""
    lines = [f"FAILED {r['mode']}: {r['error']}" for r in all_rows if "error" in r]
    rows = [r for r in all_rows if "error" not in r]
    if rows:
        worst = min(rows, key=lambda r: r["ratio"])
        verdict = "met" if worst["ratio"] >= RATIO_TARGET else "MISSED"
        lines.append(
            f"connector/raw >= {RATIO_TARGET} in every mode: {verdict} "
            f"(lowest {worst['ratio']:.2f}, {worst['mode']})"
        )
    by_mode = {r["mode"]: r for r in rows}
    if "direct" in by_mode and "staged" in by_mode:
        x = by_mode["staged"]["connector_gbps"] / by_mode["direct"]["connector_gbps"]
        lines.append(f"host-staged / direct connector GB/s: {x:.2f}x")
    released = all(r["holds_released"] == r["holds"] for r in rows)
    lines.append(f"producer holds released by the consumer's done notifications: {released}")
    lines.append(f"bytes equal the producer's everywhere: {all(r['correct'] for r in rows)}")
    return lines


def report(args: argparse.Namespace, rows: list[dict[str, Any]]) -> harness.Report:
    """The table of the modes that ran; the target lines and failures as its notes."""
    out = harness.Report("nixl-modes", title(args), COLUMNS, words=COLUMNS[-1:])
    for r in rows:
        if "error" not in r:
            out.add(_cells(r), r)
    out.notes += summary(rows)
    return out


def ok(rows: list[dict[str, Any]]) -> bool:
    """Every mode ran, its bytes were right and every producer hold was released."""
    return all(r.get("correct") and r["holds_released"] == r["holds"] for r in rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rows = run(args)
    except (ValueError, ImportError) as e:
        print(f"nixl_modes: error: {e}")
        return 2
    harness.emit([report(args, rows)], args)
    return 0 if ok(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
