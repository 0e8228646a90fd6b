"""``kvbridge bench offload``: store/load throughput of the offload copy backend.

Blocks shaped like Llama-8B's (16 tokens, head dim 128, bf16; 8 KV heads = 64 KiB per
block-layer, 4 = 32 KiB, 2 = 16 KiB; 32 layers on CUDA, fewer by default on CPU) go through
the same copy backend the CPU tier's worker uses, with its block-major CPU pool. Each transfer
size runs with consecutive CPU ids (a fresh pool) and with scattered ones (a pool that churned:
of 2N blocks, an LRU freed a random half, and N new blocks come back in those places), and in
three directions: store, load, and store plus load of N other blocks at once. The baseline is
measured in the same run: one contiguous copy of the same bytes (CUDA: pinned host <-> device,
the PCIe ceiling; both ways at once on two streams for the concurrent rows; CPU: ``copy_``).
Every row first passes a round trip of random data (``offload_check``).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import NamedTuple

import torch

from kvbridge.bench import harness
from kvbridge.bench.offload_check import Ids, churned_ids, round_trip
from kvbridge.copy.backend import CopyBackend, copy_backend_class, parse_strategy

CUDA_STRATEGIES = ("auto", "serial", "pipelined", "direct")
DIRECTIONS = ("store", "load", "store+load")
ORDERS = ("consecutive", "scattered")


class Row(NamedTuple):
    kib: int  # bytes of one block-layer, KiB
    blocks: int
    cpu_ids: str
    strategy: str
    direction: str
    nbytes: int  # moved (store+load: both ways)
    backend_s: float | None  # None: the strategy did not run
    baseline_s: float | None
    check: str  # PASS, "FAIL: parts", "skipped: why" or "error: what"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = harness.parser("kvbridge bench offload", __doc__)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--layers", type=int, default=None, help="default 32 (CUDA) / 4 (CPU)")
    parser.add_argument(
        "--blocks", type=int, nargs="+", default=None, help="default 64 256 1024 4096 / 512"
    )
    parser.add_argument(
        "--kib", type=int, nargs="+", default=None, choices=(16, 32, 64),
        help="KiB per block-layer (default 16 32 64 on CUDA, 64 on CPU)",
    )  # fmt: skip
    parser.add_argument("--cpu-ids", choices=(*ORDERS, "both"), default="both")
    parser.add_argument("--directions", type=harness.subset(DIRECTIONS), default=DIRECTIONS)
    parser.add_argument("--iters", type=int, default=None, help="default 10 (CUDA) / 5 (CPU)")
    parser.add_argument(
        "--strategy",
        type=_strategy_list,
        default=None,
        help="CUDA copy strategies, comma-separated, each NAME or STORE/LOAD (default auto, "
        "the backend's; all: each of " + ", ".join(CUDA_STRATEGIES) + ")",
    )
    parser.add_argument(
        "--both",
        choices=("interleaved", "sequential"),
        default="interleaved",
        help="store+load: one store_and_load call (interleaved chunks) or a store then a load",
    )
    parser.add_argument(
        "--layout",
        choices=("block", "layer"),
        default="block",
        help="CPU pool layout: block-major (the CPU tier's) or layer-major (NIXL's host mirror)",
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
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    args.device = "cuda" if cuda else "cpu"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if not cuda and args.strategy is not None:
        parser.error("--strategy: only the CUDA backend has copy strategies")
    args.layers = args.layers or (32 if cuda else 4)
    args.blocks = args.blocks or ([64, 256, 1024, 4096] if cuda else [512])
    args.kib = args.kib or ([16, 32, 64] if cuda else [64])
    args.iters = args.iters or (10 if cuda else 5)
    if args.threads is None and not cuda:
        args.threads = 1
    harness.positive(parser, args, "layers", "iters", "chunk_mib", "buffers")
    if min(args.threads or 1, *args.blocks) < 1:
        parser.error("--threads and --blocks: must be >= 1")
    return args


def _strategy_list(text: str) -> list[str]:
    """An argparse type: comma-separated copy strategies (``parse_strategy``) or ``all``."""
    names = text.split(",")
    for name in names:
        if name != "all":
            try:
                parse_strategy(name)
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None
    return names


def _strategies(args: argparse.Namespace) -> list[str]:
    if args.device != "cuda":
        return ["-"]
    picked = args.strategy or ["auto"]
    return list(CUDA_STRATEGIES) if "all" in picked else picked


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


class Ceilings:
    """Same-run baselines: one contiguous copy of ``nbytes`` per direction, both at once."""

    def __init__(self, device: str, max_bytes: int) -> None:
        numel = max_bytes // 2
        self.cuda = device == "cuda"
        pin = self.cuda
        self.dev = [torch.empty(numel, dtype=torch.bfloat16, device=device) for _ in range(2)]
        self.host = [torch.empty(numel, dtype=torch.bfloat16, pin_memory=pin) for _ in range(2)]
        self.streams = [torch.cuda.Stream(), torch.cuda.Stream()] if self.cuda else []

    def get(self, direction: str, nbytes: int) -> Callable[[], object]:
        n = nbytes // 2
        out = lambda: self.host[0][:n].copy_(self.dev[0][:n], non_blocking=True)  # noqa: E731
        back = lambda: self.dev[1][:n].copy_(self.host[1][:n], non_blocking=True)  # noqa: E731
        if direction == "store":
            return out
        if direction == "load":
            return back
        if not self.cuda:
            return lambda: (out(), back())

        def both() -> None:
            for stream, copy in zip(self.streams, (out, back)):
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    copy()
            for stream in self.streams:
                torch.cuda.current_stream().wait_stream(stream)

        return both


def _moves(backend: CopyBackend, ids: Ids, both_mode: str) -> dict[str, Callable[[], object]]:
    def both() -> None:
        if both_mode == "sequential":
            stored = backend.store(ids.store, ids.cpu)
            loaded = backend.load(ids.other_cpu, ids.load)
        else:
            stored, loaded = backend.store_and_load(ids.store, ids.cpu, ids.other_cpu, ids.load)
        stored.wait()
        loaded.wait()

    return {
        "store": lambda: backend.store(ids.store, ids.cpu).wait(),
        "load": lambda: backend.load(ids.other_cpu, ids.load).wait(),
        "store+load": both,
    }


def _backend(
    args: argparse.Namespace, strategy: str, gpu: list[torch.Tensor], cpu: list[torch.Tensor]
) -> CopyBackend:
    if args.device != "cuda":
        return copy_backend_class(args.device, user="bench offload")(gpu, cpu)
    from kvbridge.copy.cuda import CUDACopyBackend

    return CUDACopyBackend(
        gpu, cpu, copy_strategy=strategy, chunk_bytes=args.chunk_mib << 20, num_buffers=args.buffers
    )


def _measure_size(
    args: argparse.Namespace, kib: int, strategy: str, ceilings: Ceilings
) -> list[Row]:
    """Every size, id order and direction of one strategy at one block-layer size; one cache
    and one pool of twice the largest transfer serve them all."""
    most = max(args.blocks)
    shape = (2, 16, kib // 8, 128)  # K and V, tokens per block, KV heads, head dim
    gpu = [
        torch.empty((2 * most, *shape), dtype=torch.bfloat16, device=args.device)
        for _ in range(args.layers)
    ]
    cls = copy_backend_class(args.device, user="bench offload")
    cpu = cls.allocate_cpu_layers(gpu, 2 * most, block_major=args.layout == "block")
    orders = ORDERS if args.cpu_ids == "both" else (args.cpu_ids,)
    cases = [(n, order) for n in args.blocks for order in orders]
    rows: list[Row] = []
    try:
        backend = _backend(args, strategy, gpu, cpu)
    except ValueError as e:
        for n, order in cases:
            rows += [
                Row(kib, n, order, strategy, d, 0, None, None, f"skipped: {e}") for d in DIRECTIONS
            ]
        return rows
    try:
        for n, order in cases:
            ids = churned_ids(n, scattered=order == "scattered", seed=args.seed)
            nbytes = n * args.layers * kib << 10
            try:
                check = round_trip(backend, ids)
                for direction in args.directions:
                    moved = nbytes * (2 if direction == "store+load" else 1)
                    base = ceilings.get(direction, nbytes)
                    mine_s, base_s = _pairs(_moves(backend, ids, args.both)[direction], base, args)
                    rows.append(
                        Row(kib, n, order, strategy, direction, moved, mine_s, base_s, check)
                    )
            except Exception as e:  # one broken case must not hide the others' numbers
                what = f"error: {type(e).__name__}: {e}"
                rows += [
                    Row(kib, n, order, strategy, d, 0, None, None, what) for d in args.directions
                ]
    finally:
        backend.shutdown()
    return rows


def run(args: argparse.Namespace, rows: list[Row]) -> None:
    """Append the rows of every strategy and size to ``rows`` (strategies in order: the riskier
    ones last, so a fault that breaks the device leaves the earlier rows)."""
    ceilings = Ceilings(args.device, max(args.blocks) * args.layers * max(args.kib) << 10)
    for strategy in _strategies(args):
        for kib in args.kib:
            rows += _measure_size(args, kib, strategy, ceilings)
            if args.device == "cuda":
                torch.cuda.empty_cache()


COLUMNS = ("KiB", "blocks", "CPU ids", "strategy", "direction", "MiB", "GB/s", "ceiling GB/s")


def report(args: argparse.Namespace, rows: list[Row]) -> harness.Report:
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    baseline = "pinned<->device copy" if args.device == "cuda" else "one tensor.copy_"
    title = (
        f"offload copy backend, {where}: blocks x {args.layers} layers (KiB per block-layer, "
        f"bf16), scattered cache ids, {args.layout}-major CPU pool, {torch.get_num_threads()} "
        f"torch threads, median of {args.iters} A B B A pairs; store+load: {args.both}"
    )
    if args.device == "cuda":
        title += f"; staging: {args.buffers} x {args.chunk_mib} MiB"
    out = harness.Report(
        "offload", title, (*COLUMNS, "ratio", "check"), words=("CPU ids", "strategy", "direction")
    )
    for row in rows:
        cells = [str(row.kib), str(row.blocks), row.cpu_ids, row.strategy, row.direction]
        cells.append(f"{row.nbytes / 2**20:.0f}")
        if row.backend_s is None or row.baseline_s is None:
            cells += ["-", "-", "-"]
        else:
            mine, base = row.nbytes / row.backend_s / 1e9, row.nbytes / row.baseline_s / 1e9
            cells += [f"{mine:.1f}", f"{base:.1f}", f"{mine / base:.2f}"]
        check = row.check[:37] + "..." if len(row.check) > 40 else row.check
        out.add([*cells, check], row._asdict())
    out.notes.append(
        f"ceiling: same-run {baseline} of the same bytes (store+load: both ways at once, on two "
        "streams on CUDA); scattered: N of a churned 2N-block pool; check: round trip of "
        "random data"
    )
    out.notes += [
        f"{row.kib} KiB, {row.blocks} blocks, {row.cpu_ids}, {row.strategy}: {row.check}"
        for row in rows
        if row.check != "PASS" and row.direction == args.directions[0]
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
