"""``kvbridge bench disk``: the disk tier's write and read GB/s against plain O_DIRECT I/O.

Llama-8B-shaped blocks (16 tokens, 8 KV heads, head dim 128, bf16: 64 KiB per block and
layer, 32 layers: 2 MiB per block record) go through the disk tier's own worker
(``DiskWorker``: one checksummed record file per block, written to a temporary name and
renamed, on its I/O threads), next to a same-run baseline on the same filesystem: one file
written, then read, sequentially with O_DIRECT from one aligned buffer, in chunks of one
record, by one thread (what ``dd oflag=direct bs=<record>`` does). Both start from no files
(allocation included, after a sync) and neither syncs while timed. Pairs run A B B A. Every
read-back is checked byte for byte. Where the filesystem refuses O_DIRECT (tmpfs before Linux
6.6), both sides run buffered.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from pathlib import Path

import torch

from kvbridge.bench import harness
from kvbridge.connector.types import KVCacheSpec
from kvbridge.offload.disk.config import DiskConfig
from kvbridge.offload.disk.io import O_DIRECT, AlignedBuffer, filesystem_type, probe_direct
from kvbridge.offload.disk.metadata import DiskBlock, DiskJobs
from kvbridge.offload.disk.record import record_size
from kvbridge.offload.disk.worker import DiskWorker

HEADS, HEAD_DIM, TOKENS = 8, 128, 16  # bf16: 64 KiB per block and layer


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = harness.parser("kvbridge bench disk", __doc__)
    parser.add_argument("--dir", type=Path, default=Path("."), help="where to write (a temp dir)")
    parser.add_argument("--blocks", type=int, default=256, help="block records per transfer")
    parser.add_argument("--layers", type=int, default=32, help="layers per block (64 KiB each)")
    parser.add_argument(
        "--threads", type=harness.int_list, default=[1, 4, 16], help="I/O threads (list)"
    )
    parser.add_argument("--iters", type=int, default=3, help="A B B A pairs per row")
    parser.add_argument("--buffered", action="store_true", help="page cache, not O_DIRECT")
    args = parser.parse_args(argv)
    harness.positive(parser, args, "blocks", "layers", "iters")
    if min(args.threads) < 1:
        parser.error("--threads: must be >= 1")
    return args


class Baseline:
    """One file, written then read sequentially in ``chunk``-byte requests by one thread."""

    def __init__(self, path: Path, chunk: int, count: int, direct: bool) -> None:
        self.path, self.chunk, self.count = path, chunk, count
        self.flags = O_DIRECT if direct else 0
        self.buf = AlignedBuffer(chunk, 4096).view
        self.buf[:] = os.urandom(chunk)

    def write(self) -> None:
        self.path.unlink(missing_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | self.flags, 0o644)
        try:
            for i in range(self.count):
                if os.pwrite(fd, self.buf, i * self.chunk) != self.chunk:
                    raise OSError("short baseline write")
        finally:
            os.close(fd)

    def timed_write(self) -> float:
        self.path.unlink(missing_ok=True)
        os.sync()  # the delete's metadata reaches the disk before the clock starts
        return harness.timed(self.write)

    def timed_read(self) -> float:
        return harness.timed(self.read)

    def read(self) -> None:
        fd = os.open(self.path, os.O_RDONLY | self.flags)
        try:
            for i in range(self.count):
                if os.preadv(fd, [self.buf], i * self.chunk) != self.chunk:
                    raise OSError("short baseline read")
        finally:
            os.close(fd)


class Tier:
    """The disk tier's worker over a CPU pool of ``blocks`` blocks, and a second pool to read
    back into."""

    def __init__(self, root: Path, args: argparse.Namespace, threads: int, direct: bool) -> None:
        spec = KVCacheSpec(
            block_size=TOKENS, num_blocks=args.blocks, num_layers=args.layers,
            num_kv_heads=HEADS, head_dim=HEAD_DIM, dtype="bfloat16", model_name="bench-disk",
        )  # fmt: skip
        shape = (args.blocks, 2, TOKENS, HEADS, HEAD_DIM)
        self._memory: list[AlignedBuffer] = []
        self.src = [self._layer(shape).normal_() for _ in range(args.layers)]
        self.dst = [self._layer(shape).zero_() for _ in range(args.layers)]
        config = DiskConfig(str(root), 1 << 50, direct, 4096, threads, threads)
        self.writer = DiskWorker(config, spec, [self.src])
        self.reader = DiskWorker(config, spec, [self.dst])
        self.blocks = [DiskBlock(0, i.to_bytes(16, "little"), i) for i in range(args.blocks)]
        self.root = self.writer.ns_dir

    def _layer(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A page-aligned layer, as pinned host memory is (so records go in place)."""
        n = 1
        for d in shape:
            n *= d
        memory = AlignedBuffer(2 * n, 4096)
        self._memory.append(memory)
        return torch.frombuffer(memory.view, dtype=torch.bfloat16).view(shape)

    def _run(self, worker: DiskWorker, jobs: DiskJobs) -> None:
        worker.submit(jobs)
        worker.wait_idle(timeout_s=600.0)
        done = worker.poll()
        if done is None or done.write_failed or done.read_missing or done.read_corrupt:
            raise RuntimeError(f"disk tier bench: I/O failed: {done}")

    def clear(self) -> None:
        self._run(self.writer, DiskJobs(deletes=self.blocks))

    def write(self) -> None:
        self._run(self.writer, DiskJobs(writes=self.blocks))

    def read(self) -> None:
        self._run(self.reader, DiskJobs(reads=self.blocks))

    def timed_write(self) -> float:
        self.clear()
        os.sync()
        return harness.timed(self.write)

    def timed_read(self) -> float:
        return harness.timed(self.read)

    def check(self) -> bool:
        return all(torch.equal(a, b) for a, b in zip(self.src, self.dst))

    def shutdown(self) -> None:
        self.writer.shutdown()
        self.reader.shutdown()


def _pairs(mine: list[float], base: list[float]) -> tuple[float, float, float]:
    return statistics.median(mine), statistics.median(base), harness.paired_ratio(mine, base)


def _rows(
    report: harness.Report,
    tier: Tier,
    baseline: Baseline,
    threads: int,
    iters: int,
    labels: dict[str, str],
) -> bool:
    """A write row and a read row for ``tier`` (after a checked, untimed round trip)."""
    tier.clear()
    tier.write()
    tier.read()
    baseline.write()
    baseline.read()
    passed = tier.check()
    nbytes = baseline.chunk * baseline.count
    for direction, mine, base in (
        ("write CPU->disk", tier.timed_write, baseline.timed_write),
        ("read disk->CPU", tier.timed_read, baseline.timed_read),
    ):
        mine_s, base_s = harness.abba(mine, base, iters)
        t, b, ratio = _pairs(mine_s, base_s)
        report.add(
            [direction, str(threads), f"{nbytes / t / 1e9:.2f}", f"{nbytes / b / 1e9:.2f}",
             f"{ratio:.2f}x", "PASS" if passed else "FAIL"],
            {"direction": direction, "threads": threads, "bytes": nbytes, "tier_s": t,
             "baseline_s": b, "ratio": ratio, "check": passed, **labels},
        )  # fmt: skip
    return passed


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    root = Path(tempfile.mkdtemp(prefix="kvbridge-bench-disk-", dir=args.dir))
    try:
        return _bench(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _bench(args: argparse.Namespace, root: Path) -> int:
    fs = filesystem_type(root)
    refused = None if args.buffered else probe_direct(root, 4096)
    direct = not args.buffered and refused is None
    payload = args.layers * 2 * TOKENS * HEADS * HEAD_DIM * 2
    size = record_size(payload, 4096)
    nbytes = size * args.blocks
    mode = "O_DIRECT" if direct else "buffered"
    report = harness.Report(
        "disk",
        f"disk tier vs plain {mode} sequential I/O on {fs} ({root.parent}), {args.blocks} "
        f"records of {size / 2**20:.2f} MiB ({nbytes / 2**20:.0f} MiB), median of {args.iters} "
        "A B B A pairs",
        ("direction", "threads", "tier GB/s", "baseline GB/s", "tier / baseline", "check"),
        words=("direction", "check"),
    )
    if refused is not None:
        report.notes.append(f"O_DIRECT refused on {fs} ({refused}): both sides buffered")
    baseline = Baseline(root / "baseline.bin", size, args.blocks, direct)
    ok = True
    for threads in args.threads:
        tier = Tier(root, args, threads, direct)
        try:
            ok &= _rows(
                report, tier, baseline, threads, args.iters, {"filesystem": fs, "mode": mode}
            )
        finally:
            tier.shutdown()
    report.notes.append(
        "tier: one file per block (tmp + rename), header and xxh3 checksums, payload in place "
        "from page-aligned layers (as pinned memory; unaligned rows go through a staging "
        "buffer); baseline: one file, one thread, one aligned buffer"
    )
    harness.emit([report], args)
    return 0 if ok else 1
