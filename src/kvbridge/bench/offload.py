"""``kvbridge bench offload``: store/load throughput of the offload copy backend.

Llama-8B-shaped blocks (8 KV heads, head dim 128, 16 tokens per block, bf16; 32 layers on
CUDA, fewer by default on CPU) go through the same copy backend the worker uses, next to a
same-run baseline of one contiguous copy of the same number of bytes (CPU: ``copy_`` between
two buffers; CUDA: pinned host <-> device). A correctness check on random data runs first.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from rich.console import Console
from rich.table import Table

from kvbridge.offload.copy import CopyBackend, backend_name_for, copy_backend_class

BLOCK_SHAPE = (2, 16, 8, 128)  # K and V, tokens per block, KV heads, head dim


class Row(NamedTuple):
    direction: str
    nbytes: int
    backend_s: float
    baseline_s: float


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kvbridge bench offload", description=__doc__)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--layers", type=int, default=None, help="default 32 (CUDA) / 4 (CPU)")
    parser.add_argument("--blocks", type=int, default=512, help="blocks per transfer")
    parser.add_argument("--iters", type=int, default=None, help="default 20 (CUDA) / 9 (CPU)")
    parser.add_argument(
        "--gpu-ids",
        choices=("scattered", "consecutive"),
        default="scattered",
        help="cache block ids: a random sample of a cache twice as large, or one run",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads for both backend and baseline (default 1 on CPU: stable on a "
        "shared machine; CUDA: unchanged)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.layers is None:
        args.layers = 32 if args.device == "cuda" else 4
    if args.iters is None:
        args.iters = 20 if args.device == "cuda" else 9
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    if args.layers < 1 or args.blocks < 1 or args.iters < 1 or (args.threads or 1) < 1:
        parser.error("--layers, --blocks, --iters and --threads must be >= 1")
    return args


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object], device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _check(backend: CopyBackend, gpu_ids: list[int], cpu_ids: list[int], back: list[int]) -> bool:
    """Store random blocks, scramble the cache, load them elsewhere: bytes must match."""
    for layer in backend.gpu_layers:
        layer.normal_()
    want = [layer[gpu_ids].clone() for layer in backend.gpu_layers]
    backend.store(gpu_ids, cpu_ids).wait()
    for layer in backend.gpu_layers:
        layer.normal_()
    backend.load(cpu_ids, back).wait()
    return all(torch.equal(layer[back], w) for layer, w in zip(backend.gpu_layers, want))


def run(args: argparse.Namespace) -> tuple[list[Row], bool]:
    device, n = args.device, args.blocks
    gen = torch.Generator().manual_seed(args.seed)
    cache_blocks = 2 * n
    gpu_layers = [
        torch.empty((cache_blocks, *BLOCK_SHAPE), dtype=torch.bfloat16, device=device)
        for _ in range(args.layers)
    ]
    cls = copy_backend_class(backend_name_for(device))
    backend = cls(gpu_layers, cls.allocate_cpu_layers(gpu_layers, n))
    if args.gpu_ids == "scattered":
        perm = torch.randperm(cache_blocks, generator=gen).tolist()
        store_ids, load_ids = perm[:n], perm[n:]
    else:
        store_ids, load_ids = list(range(n)), list(range(n, 2 * n))
    cpu_ids = list(range(n))  # a fresh pool hands out consecutive ids
    correct = _check(backend, store_ids, cpu_ids, load_ids)

    nbytes = n * args.layers * gpu_layers[0][0].numel() * gpu_layers[0].element_size()
    numel = nbytes // 2
    if device == "cuda":
        dev = torch.empty(numel, dtype=torch.bfloat16, device=device)
        host = torch.empty(numel, dtype=torch.bfloat16, pin_memory=True)
        base_store: Callable[[], object] = lambda: host.copy_(dev, non_blocking=True)  # noqa: E731
        base_load: Callable[[], object] = lambda: dev.copy_(host, non_blocking=True)  # noqa: E731
    else:
        src = torch.empty(numel, dtype=torch.bfloat16).normal_()
        dst = torch.empty_like(src)
        base_store = base_load = lambda: dst.copy_(src)
    cases = {
        "store GPU->CPU": (lambda: backend.store(store_ids, cpu_ids).wait(), base_store),
        "load CPU->GPU": (lambda: backend.load(cpu_ids, load_ids).wait(), base_load),
    }
    times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in cases}
    for _ in range(args.iters + 1):  # the first round warms up and is dropped
        for name, (mine, base) in cases.items():
            times[name][0].append(_timed(mine, device))
            times[name][1].append(_timed(base, device))
    backend.shutdown()
    rows = [
        Row(name, nbytes, statistics.median(t[0][1:]), statistics.median(t[1][1:]))
        for name, t in times.items()
    ]
    return rows, correct


def _table(args: argparse.Namespace, rows: list[Row], correct: bool) -> Table:
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    baseline = "pinned<->device copy" if args.device == "cuda" else "one tensor.copy_"
    table = Table(
        title=(
            f"offload copy backend, {where}: {args.blocks} blocks x {args.layers} layers "
            f"(64 KiB per block-layer, bf16), {args.gpu_ids} cache ids, "
            f"{torch.get_num_threads()} torch threads, median of {args.iters}"
        ),
        caption=f"correctness on random data: {'PASS' if correct else 'FAIL'}",
    )
    for col in ("direction", "MiB", "kvbridge GB/s", f"baseline GB/s ({baseline})", "ratio"):
        table.add_column(col, justify="left" if col == "direction" else "right")
    for row in rows:
        mine, base = row.nbytes / row.backend_s / 1e9, row.nbytes / row.baseline_s / 1e9
        table.add_row(
            row.direction,
            f"{row.nbytes / 2**20:.0f}",
            f"{mine:.1f}",
            f"{base:.1f}",
            f"{mine / base:.2f}",
        )
    return table


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows, correct = run(args)
    Console().print(_table(args, rows, correct))
    return 0 if correct else 1
