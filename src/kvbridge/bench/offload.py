"""``kvbridge bench offload``: store/load throughput of the offload copy backend.

Llama-8B-shaped blocks (8 KV heads, head dim 128, 16 tokens per block, bf16; 32 layers on
CUDA, fewer by default on CPU) go through the same copy backend the worker uses, next to a
same-run baseline of one contiguous copy of the same number of bytes (CPU: ``copy_`` between
two buffers; CUDA: pinned host <-> device, the PCIe ceiling). On CUDA every copy strategy
(``--strategy``) gets its own rows. Each strategy first passes a round trip of random data
into poisoned destinations: stored bytes equal in the CPU pool, loaded bytes equal in the
cache, every other cache block still poison.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import NamedTuple

import torch

from kvbridge.bench import harness
from kvbridge.copy.backend import CopyBackend, copy_backend_class

BLOCK_SHAPE = (2, 16, 8, 128)  # K and V, tokens per block, KV heads, head dim
CUDA_STRATEGIES = ("serial", "pipelined", "direct")
POISON = -7.0
DIRECTIONS = ("store GPU->CPU", "load CPU->GPU")


class Row(NamedTuple):
    blocks: int
    strategy: str
    direction: str
    nbytes: int
    backend_s: float | None  # None: the strategy did not run
    baseline_s: float | None
    check: str  # PASS, "FAIL: parts", "skipped: why" or "error: what"


class Ids(NamedTuple):
    store: list[int]  # cache blocks stored
    cpu: list[int]  # CPU blocks they go to
    load: list[int]  # cache blocks they come back to


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = harness.parser("kvbridge bench offload", __doc__)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--layers", type=int, default=None, help="default 32 (CUDA) / 4 (CPU)")
    parser.add_argument(
        "--blocks", type=int, nargs="+", default=[512], help="blocks per transfer (one or more)"
    )
    parser.add_argument("--iters", type=int, default=None, help="default 20 (CUDA) / 9 (CPU)")
    parser.add_argument(
        "--gpu-ids",
        choices=("scattered", "consecutive"),
        default="scattered",
        help="cache block ids: a random sample of a cache twice as large, or one run",
    )
    parser.add_argument(
        "--cpu-ids",
        choices=("consecutive", "scattered"),
        default="consecutive",
        help="CPU block ids: one run (a fresh pool) or a random permutation (a fragmented one)",
    )
    parser.add_argument(
        "--strategy",
        choices=(*CUDA_STRATEGIES, "all"),
        default=None,
        help="CUDA copy strategy to measure (default all); the CPU backend has just one",
    )
    parser.add_argument("--chunk-mib", type=int, default=32, help="pipelined: MiB per buffer")
    parser.add_argument("--buffers", type=int, default=2, help="pipelined: staging buffers")
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
    if args.device == "cpu" and args.strategy is not None:
        parser.error("--strategy: only the CUDA backend has copy strategies")
    if args.layers is None:
        args.layers = 32 if args.device == "cuda" else 4
    if args.iters is None:
        args.iters = 20 if args.device == "cuda" else 9
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    harness.positive(parser, args, "layers", "iters", "chunk_mib", "buffers")
    if min(args.threads or 1, *args.blocks) < 1:
        parser.error("--threads and --blocks: must be >= 1")
    return args


def _strategies(args: argparse.Namespace) -> list[str]:
    if args.device != "cuda":
        return ["-"]
    return list(CUDA_STRATEGIES) if args.strategy in (None, "all") else [args.strategy]


def _pairs(
    mine: Callable[[], object], base: Callable[[], object], args: argparse.Namespace
) -> tuple[float, float]:
    """Median seconds of ``mine`` and of its baseline over ``args.iters`` A B B A pairs, after
    one untimed run of each."""
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    harness.timed(mine, sync)
    harness.timed(base, sync)
    mine_s, base_s = harness.abba(
        lambda: harness.timed(mine, sync), lambda: harness.timed(base, sync), args.iters
    )
    return statistics.median(mine_s), statistics.median(base_s)


def _check(backend: CopyBackend, ids: Ids) -> str:
    """Store random blocks into a poisoned pool, load them into a poisoned cache elsewhere;
    ``PASS`` or ``FAIL:`` and the parts that went wrong."""
    for layer in backend.gpu_layers:
        layer.normal_()
    for layer in backend.cpu_layers:
        layer.fill_(POISON)
    want = [layer[ids.store].clone() for layer in backend.gpu_layers]
    backend.store(ids.store, ids.cpu).wait()
    stored = all(torch.equal(c[ids.cpu].to(w.device), w) for c, w in zip(backend.cpu_layers, want))
    for layer in backend.gpu_layers:
        layer.fill_(POISON)
    backend.load(ids.cpu, ids.load).wait()
    loaded = all(torch.equal(g[ids.load], w) for g, w in zip(backend.gpu_layers, want))
    back = torch.tensor(ids.load, device=want[0].device)
    untouched = all(
        bool((g.index_fill_(0, back, POISON) == POISON).all()) for g in backend.gpu_layers
    )
    failed = [k for k, ok in (("store", stored), ("load", loaded), ("others", untouched)) if not ok]
    return f"FAIL: {', '.join(failed)}" if failed else "PASS"


def _ids(args: argparse.Namespace, n: int) -> Ids:
    gen = torch.Generator().manual_seed(args.seed)
    if args.gpu_ids == "scattered":
        perm = torch.randperm(2 * n, generator=gen).tolist()
        store, load = perm[:n], perm[n:]
    else:
        store, load = list(range(n)), list(range(n, 2 * n))
    scattered = args.cpu_ids == "scattered"
    cpu = torch.randperm(n, generator=gen).tolist() if scattered else list(range(n))
    return Ids(store, cpu, load)


def _backend(
    args: argparse.Namespace,
    strategy: str,
    gpu_layers: list[torch.Tensor],
    cpu_layers: list[torch.Tensor],
) -> CopyBackend:
    if args.device != "cuda":
        return copy_backend_class(args.device, user="bench offload")(gpu_layers, cpu_layers)
    from kvbridge.copy.cuda import CUDACopyBackend

    return CUDACopyBackend(
        gpu_layers,
        cpu_layers,
        copy_strategy=strategy,
        chunk_bytes=args.chunk_mib << 20,
        num_buffers=args.buffers,
    )


def _measure(args: argparse.Namespace, strategy: str, n: int) -> list[Row]:
    """One strategy at one transfer size; rows say why where it could not run."""
    device, ids = args.device, _ids(args, n)
    gpu_layers = [
        torch.empty((2 * n, *BLOCK_SHAPE), dtype=torch.bfloat16, device=device)
        for _ in range(args.layers)
    ]
    cls = copy_backend_class(device, user="bench offload")
    cpu_layers = cls.allocate_cpu_layers(gpu_layers, n)
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
    try:
        backend = _backend(args, strategy, gpu_layers, cpu_layers)
    except ValueError as e:
        return [Row(n, strategy, d, nbytes, None, None, f"skipped: {e}") for d in DIRECTIONS]
    try:
        check = _check(backend, ids)
        times = [
            _pairs(lambda: backend.store(ids.store, ids.cpu).wait(), base_store, args),
            _pairs(lambda: backend.load(ids.cpu, ids.load).wait(), base_load, args),
        ]
    except Exception as e:  # one broken strategy must not hide the others' numbers
        what = f"error: {type(e).__name__}: {e}"
        return [Row(n, strategy, d, nbytes, None, None, what) for d in DIRECTIONS]
    finally:
        backend.shutdown()
    return [Row(n, strategy, d, nbytes, t, b, check) for d, (t, b) in zip(DIRECTIONS, times)]


def run(args: argparse.Namespace, rows: list[Row]) -> None:
    """Append the rows of every strategy and size to ``rows`` (strategies in order: the riskier
    ones last, so a fault that breaks the device leaves the earlier rows)."""
    for strategy in _strategies(args):
        for n in args.blocks:
            rows += _measure(args, strategy, n)
            if args.device == "cuda":
                torch.cuda.empty_cache()


COLUMNS = ("blocks", "strategy", "direction", "MiB", "kvbridge GB/s", "ceiling GB/s")


def report(args: argparse.Namespace, rows: list[Row]) -> harness.Report:
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    baseline = "pinned<->device copy" if args.device == "cuda" else "one tensor.copy_"
    title = (
        f"offload copy backend, {where}: blocks x {args.layers} layers "
        f"(64 KiB per block-layer, bf16), {args.gpu_ids} cache ids, {args.cpu_ids} CPU ids, "
        f"{torch.get_num_threads()} torch threads, median of {args.iters} A B B A pairs"
    )
    if args.device == "cuda":
        title += f"; pipelined: {args.buffers} x {args.chunk_mib} MiB"
    out = harness.Report("offload", title, (*COLUMNS, "ratio", "check"), words=COLUMNS[1:3])
    for row in rows:
        cells = [str(row.blocks), row.strategy, row.direction, f"{row.nbytes / 2**20:.0f}"]
        if row.backend_s is None or row.baseline_s is None:
            cells += ["-", "-", "-"]
        else:
            mine, base = row.nbytes / row.backend_s / 1e9, row.nbytes / row.baseline_s / 1e9
            cells += [f"{mine:.1f}", f"{base:.1f}", f"{mine / base:.2f}"]
        out.add(
            [*cells, row.check[:37] + "..." if len(row.check) > 40 else row.check], row._asdict()
        )
    out.notes.append(
        f"ceiling: same-run {baseline} of the same bytes; check: round trip on random data into "
        "poisoned destinations"
    )
    out.notes += [
        f"{row.blocks} blocks, {row.strategy}: {row.check}"
        for row in rows
        if row.check != "PASS" and row.direction == DIRECTIONS[0]
    ]
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows: list[Row] = []
    try:
        run(args, rows)
    finally:
        harness.emit([report(args, rows)], args)
    ok = all(row.check == "PASS" or row.check.startswith("skipped") for row in rows)
    return 0 if ok else 1
