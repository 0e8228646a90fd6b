"""``kvbridge bench nixl``: the NixlConnector's READ path against raw NIXL, same memory, same time.

A producer process registers a KV cache with a real ``NixlWorker`` (kv_producer, DRAM) and
holds each benchmark request under a lease; this process runs a consumer ``NixlWorker``
built by the connector factory and loads blocks from it through the connector API (metadata
with a ``RecvSpec``, ``start_load_kv``, ``get_finished``): descriptor planning, READ,
polling, and what the connector does around the READ (the lease question, the board READ of
the producer's lease word, the done notification).

The baseline is a second NIXL agent in this process (``RawReader``) with its own zeroed copy
of the cache, attached to the same producer agent: it READs the same producer memory with the
descriptors the connector plans (``plan_read`` with the case's merge setting), its dlists
prepared once, outside timing; one raw READ = make transfer + post + poll to DONE + release.
Connector and raw READs alternate, each timed iteration one of each, the first of the pair
swapped every iteration (ABBA), so both see the same machine; the paired ratio (median of
raw_i / connector_i) is the robust number on a busy host.

Cases: block ids contiguous on both sides or every other block (fragmented), with
``merge_contiguous_blocks`` on and off. A connector read is timed from ``start_load_kv`` until
the request is in ``finished_recving``; the first pair (it includes the handshake) is dropped.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import time
from typing import TYPE_CHECKING, NamedTuple

from kvbridge.bench import harness
from kvbridge.bench.harness import paired_ratio
from kvbridge.bench.nixl_idle import idle_core_share
from kvbridge.bench.nixl_peer import (
    HOST,
    KV_HEADS,
    SEED,
    TIMEOUT_S,
    TOKENS_PER_BLOCK,
    ProducerProcess,
    kv_caches,
    make_spec,
    nixl_config,
    recv_spec,
)
from kvbridge.bench.nixl_raw_reader import RawReader
from kvbridge.connector.base import KVConnectorRole, KVConnectorWorker
from kvbridge.connector.factory import create_connector
from kvbridge.connector.stats import KVConnectorStats
from kvbridge.nixl import stats as keys
from kvbridge.nixl.metadata import NixlConnectorMetadata, RecvSpec
from kvbridge.nixl.settings import DEFAULT_PROGRESS_DELAY_US
from kvbridge.nixl.transport import LiveCounts

if TYPE_CHECKING:
    import torch


class Case(NamedTuple):
    pattern: str  # "contiguous" | "fragmented"
    merge: bool


class CaseResult(NamedTuple):
    seconds: tuple[float, ...]  # per timed connector READ, wall clock
    raw_seconds: tuple[float, ...]  # per timed raw READ, paired with ``seconds``
    num_descs: int  # descriptors the connector handed NIXL per READ
    raw_descs: int  # descriptors NIXL counted in the first raw READ
    phase_ms: dict[str, float]  # stats key -> median milliseconds over the timed READs
    correct: bool  # the bytes read (connector and raw) equal the producer's
    plan_post_ms: tuple[float, float] = (0.0, 0.0)  # the connector's plan_read, make xfer
    by_board: int = 0  # loads (the warm-up too) accepted on the producer's lease board word


PHASES = (keys.POST_TIME, keys.XFER_TIME, keys.CONFIRM_TIME, keys.BOARD_READ_TIME)
PLAN_POST_ITERS = 10


class Row(NamedTuple):
    case: Case
    nbytes: int
    result: CaseResult


class RunResult(NamedTuple):
    rows: list[Row]
    ok: bool  # bytes correct, every hold released, nothing leaked
    notes: str
    producer_core_share: float = 0.0  # the producer process's CPU / wall over the cases
    idle_core_share: dict[int, float] = {}  # progress delay (us) -> an idle agent's CPU / wall


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = harness.parser("kvbridge bench nixl", __doc__)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--blocks", type=int, default=64, help="blocks per READ (per layer)")
    p.add_argument("--block-kib", type=int, default=64, help="bytes of one block-layer")
    p.add_argument("--iters", type=int, default=30, help="timed READ pairs per case")
    p.add_argument(
        "--progress-delay-us",
        type=int,
        default=DEFAULT_PROGRESS_DELAY_US,
        help="every agent's NIXL progress-thread delay (the connector's progress_delay_us; "
        "0: NIXL's own, a spinning thread)",
    )
    p.add_argument(
        "--idle-s",
        type=float,
        default=10.0,
        help="seconds to measure an idle agent's CPU, at this delay and at 0 (0: skip)",
    )
    p.add_argument(
        "--profile-loads",
        type=int,
        default=0,
        help="instead of the cases: this many loads back to back, each part of a load timed "
        "(kvbridge.bench.nixl_profile)",
    )
    p.add_argument("--profile-pattern", choices=("contiguous", "fragmented"), default="contiguous")
    p.add_argument(
        "--cprofile", type=int, default=0, help="with --profile-loads: print cProfile's top N"
    )
    args = p.parse_args(argv)
    harness.positive(p, args, "layers", "blocks", "iters")
    if args.progress_delay_us < 0 or args.idle_s < 0:
        p.error("--progress-delay-us and --idle-s must be >= 0")
    per_head_dim = 2 * TOKENS_PER_BLOCK * KV_HEADS * 4  # K and V, float32
    if args.block_kib < 1 or (args.block_kib * 1024) % per_head_dim:
        p.error(f"--block-kib: must be a positive multiple of {per_head_dim // 1024}")
    return args


def block_ids(pattern: str, blocks: int) -> list[int]:
    return list(range(blocks)) if pattern == "contiguous" else list(range(0, 2 * blocks, 2))


# -- consumer (this process) -----------------------------------------------------------------
def _read(worker: KVConnectorWorker, spec: RecvSpec) -> float:
    """One load through the connector; seconds from ``start_load_kv`` to ``finished_recving``."""
    meta = NixlConnectorMetadata(reqs_to_recv={spec.request_id: spec})
    deadline = time.monotonic() + TIMEOUT_S
    start = time.perf_counter()
    worker.bind_connector_metadata(meta)
    try:
        worker.start_load_kv()
        while spec.request_id not in worker.get_finished(frozenset()).recving:
            if time.monotonic() > deadline:
                raise TimeoutError(f"READ of {spec.request_id} not done in {TIMEOUT_S:g}s")
    finally:
        worker.clear_connector_metadata()
    seconds = time.perf_counter() - start
    if worker.get_block_ids_with_load_errors():
        raise RuntimeError(
            f"READ of {spec.request_id} failed: {worker.build_connector_worker_meta()}"
        )
    return seconds


def run_case(
    worker: KVConnectorWorker,
    cache: dict[str, torch.Tensor],
    raw: RawReader,
    producer: ProducerProcess,
    case: Case,
    iters: int,
    blocks: int,
) -> CaseResult:
    """``iters`` pairs of one connector READ and one raw READ (ABBA), after a warm-up pair."""
    import torch

    ids = block_ids(case.pattern, blocks)
    tag = f"{case.pattern}-{'merge' if case.merge else 'nomerge'}"
    specs = [recv_spec(f"{tag}-{i}", ids, producer.port) for i in range(iters + 1)]
    producer.hold([s.request_id for s in specs], ids)
    for tensor in (*cache.values(), *raw.cache.values()):
        tensor.zero_()
    with raw.prepared(
        specs[0].local_block_ids, specs[0].remote_block_ids, merge=case.merge
    ) as xfer:
        _read(worker, specs[0])  # warm-up pair: the connector's handshake, NIXL's first use
        raw_descs = raw.read(xfer, telemetry=True).nixl_descs
        timed = iter(specs[1:])
        mine, theirs = harness.abba(
            lambda: _read(worker, next(timed)), lambda: raw.read(xfer).seconds, iters
        )
    # the connector's planning and posting on real agents (the raw reader's, untimed READ)
    posts = [raw.plan_post([ids], [ids], merge=case.merge) for _ in range(PLAN_POST_ITERS)]
    plan_post_ms = tuple(1e3 * statistics.median(p[k] for p in posts) for k in (0, 1))
    stats = worker.get_kv_connector_stats()
    data = stats.data if isinstance(stats, KVConnectorStats) else {}
    descs = data.get(keys.NUM_DESCRIPTORS, [])
    if not isinstance(descs, list) or len(descs) != len(specs):
        raise RuntimeError(f"connector stats counted {descs!r} descriptor samples")
    phase_ms = {}
    for key in PHASES:  # a sample per READ: the warm-up's dropped; else those there are
        samples = data.get(key)
        if isinstance(samples, list) and samples:
            timed_samples = samples[1:] if len(samples) == len(specs) else samples
            phase_ms[key] = 1e3 * statistics.median(timed_samples or samples)
    by_board = data.get(keys.BOARD_CONFIRMS, 0)
    expected = kv_caches(worker.cache_spec, SEED)
    correct = all(
        torch.equal(got[name][ids], want[ids])
        for got in (cache, raw.cache)
        for name, want in expected.items()
    )
    return CaseResult(
        tuple(mine),
        tuple(theirs),
        int(descs[-1]),
        xfer.num_descs if raw_descs is None else raw_descs,
        phase_ms,
        correct,
        (plan_post_ms[0], plan_post_ms[1]),
        int(by_board) if isinstance(by_board, int) else 0,
    )


def run(args: argparse.Namespace) -> RunResult:
    """Every case through the connector and raw NIXL, interleaved, against one producer."""
    spec = make_spec(args.layers, args.blocks, args.block_kib)
    nbytes = args.blocks * spec.num_layers * spec.block_bytes_per_layer
    delay = {"progress_delay_us": args.progress_delay_us}
    producer = ProducerProcess(args.layers, args.blocks, args.block_kib, delay)
    rows: list[Row] = []
    leaked = None
    expected = 4 * (args.iters + 1)  # every READ's done notification releases one hold
    try:
        raw = RawReader(spec, HOST, producer.port, progress_delay_us=args.progress_delay_us)
        cpu0, wall0 = producer.cpu()
        try:
            for merge in (True, False):
                config = nixl_config(
                    "kv_consumer", f"bench-consumer-{merge}", merge_contiguous_blocks=merge, **delay
                )
                worker = create_connector(config, KVConnectorRole.WORKER, spec)
                cache = kv_caches(spec, None)
                try:
                    worker.register_kv_caches(cache)
                    for pattern in ("contiguous", "fragmented"):
                        case = Case(pattern, merge)
                        result = run_case(
                            worker, cache, raw, producer, case, args.iters, args.blocks
                        )
                        rows.append(Row(case, nbytes, result))
                finally:
                    worker.shutdown()
        finally:
            leaked = raw.close()
        cpu1, wall1 = producer.cpu()
        producer.wait_released(expected)
    finally:
        released = producer.stop()
    idle = {}
    if args.idle_s > 0:
        for delay_us in dict.fromkeys((args.progress_delay_us, 0)):
            idle[delay_us] = idle_core_share(delay_us, args.idle_s)
    clean = leaked == LiveCounts(0, 0, 0, 0)
    notes = (
        f"producer holds released by done notifications: {released}/{expected}; "
        f"raw reader {'released every NIXL handle' if clean else f'leaked {leaked}'}"
    )
    correct = all(row.result.correct for row in rows)
    ok = correct and released == expected and clean
    return RunResult(rows, ok, notes, (cpu1 - cpu0) / (wall1 - wall0), idle)


def _nixl_version() -> str:
    for dist in ("nixl", "nixl-cu12", "nixl-cu13"):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "nixl (version unknown)"


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


COLUMNS = (
    "block ids",
    "merge runs",
    "MiB/READ",
    "connector descs",
    "NIXL descs (raw)",
    "connector GB/s",
    "raw GB/s",
    "ratio of medians",
    "paired ratio",
    "connector ms: READ / post / NIXL xfer / confirm / board",
    "by board",
    "plan + make xfer ms (per GiB)",
)


def _cells(row: Row) -> list[str]:
    r = row.result
    mine = [_gbps(row.nbytes, f(r.seconds)) for f in (statistics.median, min)]
    raw = [_gbps(row.nbytes, f(r.raw_seconds)) for f in (statistics.median, min)]
    phases = [1e3 * statistics.median(r.seconds)] + [r.phase_ms.get(k, 0.0) for k in PHASES]
    plan, post = r.plan_post_ms
    return [
        row.case.pattern,
        "on" if row.case.merge else "off",
        f"{row.nbytes / 2**20:.0f}",
        str(r.num_descs),
        str(r.raw_descs),
        f"{mine[0]:.2f} / {mine[1]:.2f}",
        f"{raw[0]:.2f} / {raw[1]:.2f}",
        f"{mine[0] / raw[0]:.2f}",
        f"{paired_ratio(r.seconds, r.raw_seconds):.2f}",
        " / ".join(f"{ms:.2f}" for ms in phases),
        f"{r.by_board}/{len(r.seconds) + 1}",
        f"{plan:.2f} + {post:.2f} ({(plan + post) * 2**30 / row.nbytes:.2f})",
    ]


def report(args: argparse.Namespace, result: RunResult) -> harness.Report:
    title = (
        f"NixlConnector READ vs raw NIXL READ of the same producer memory, DRAM, two processes "
        f"({_nixl_version()}, UCX): {args.blocks} blocks x {args.layers} layers x "
        f"{args.block_kib} KiB per READ, {args.iters} interleaved pairs per case; GB/s as "
        "median / best; paired ratio = median of raw time / connector time per pair"
    )
    out = harness.Report("nixl", title, COLUMNS, words=COLUMNS[1:2])
    for row in result.rows:
        data = {"pattern": row.case.pattern, "merge": row.case.merge, "nbytes": row.nbytes}
        out.add(_cells(row), {**data, **row.result._asdict()})
    correct = all(row.result.correct for row in result.rows)
    out.notes.append(
        f"bytes read (connector and raw) equal the producer's: {'PASS' if correct else 'FAIL'}; "
        f"{result.notes}"
    )
    idle = ", ".join(
        f"{100 * share:.1f} % at {delay} us" for delay, share in result.idle_core_share.items()
    )
    out.notes.append(
        f"CPU (getrusage, all threads), % of one core: the producer while the cases ran "
        f"{100 * result.producer_core_share:.1f} % (progress delay {args.progress_delay_us} us)"
        + (f"; one idle agent over {args.idle_s:g} s: {idle}" if idle else "")
    )
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.profile_loads > 0:
        from kvbridge.bench.nixl_profile import profile

        harness.emit([profile(args)], args)
        return 0
    result = run(args)
    harness.emit([report(args, result)], args)
    return 0 if result.ok else 1
