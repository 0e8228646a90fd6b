"""``kvbridge bench nixl``: the NixlConnector's READ path against raw NIXL, two processes.

A producer process registers a KV cache with a real ``NixlWorker`` (kv_producer, DRAM) and
holds each benchmark request under a lease; this process runs a consumer ``NixlWorker``
built by the connector factory and loads blocks from it through the connector API (metadata
with a ``RecvSpec``, ``start_load_kv``, ``get_finished``): descriptor planning, READ,
polling, whatever the connector does after the READ (notification, lease confirmation).
Each case is timed next to ``run_raw_read`` moving the same bytes in descriptors of the same
sizes (same count, same adjacency), in the same run.

Cases: block ids contiguous on both sides or every other block (fragmented), with
``merge_contiguous_blocks`` on and off. A read is timed from ``start_load_kv`` until the
request is in ``finished_recving``; the first one (it includes the handshake) is dropped.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import time
from typing import TYPE_CHECKING, Any, NamedTuple

from kvbridge.bench.nixl_peer import (
    HOST,
    KV_HEADS,
    PRODUCER_ID,
    SEED,
    TIMEOUT_S,
    TOKENS_PER_BLOCK,
    ProducerProcess,
    kv_caches,
    make_spec,
    nixl_config,
)
from kvbridge.connector.base import KVConnectorRole, KVConnectorWorker
from kvbridge.connector.factory import create_connector
from kvbridge.connector.stats import KVConnectorStats
from kvbridge.connector.types import KVCacheSpec
from kvbridge.nixl import stats as keys
from kvbridge.nixl.metadata import NixlConnectorMetadata, RecvSpec
from kvbridge.nixl.raw_bench import RawReadResult, run_raw_read

if TYPE_CHECKING:
    import torch


class Case(NamedTuple):
    pattern: str  # "contiguous" | "fragmented"
    merge: bool


class RawKey(NamedTuple):
    """A raw read with the descriptor pattern of a connector case."""

    block_bytes: int
    num_blocks: int
    block_ids: tuple[int, ...]


class CaseResult(NamedTuple):
    seconds: tuple[float, ...]  # per timed READ, wall clock
    num_descs: int  # descriptors the connector handed NIXL per READ
    phase_ms: dict[str, float]  # stats key -> median milliseconds over the timed READs
    correct: bool  # the bytes read equal the producer's


PHASES = (keys.POST_TIME, keys.XFER_TIME, keys.CONFIRM_TIME)


class Row(NamedTuple):
    case: Case
    nbytes: int
    connector: CaseResult
    raw: RawReadResult


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kvbridge bench nixl", description=__doc__)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=64, help="blocks per READ (per layer)")
    parser.add_argument("--block-kib", type=int, default=64, help="bytes of one block-layer")
    parser.add_argument("--iters", type=int, default=30, help="timed READs per case")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args(argv)
    if min(args.layers, args.blocks, args.iters) < 1:
        parser.error("--layers, --blocks and --iters must be >= 1")
    per_head_dim = 2 * TOKENS_PER_BLOCK * KV_HEADS * 4  # K and V, float32
    if args.block_kib < 1 or (args.block_kib * 1024) % per_head_dim:
        parser.error(f"--block-kib: must be a positive multiple of {per_head_dim // 1024}")
    return args


def block_ids(pattern: str, blocks: int) -> list[int]:
    return list(range(blocks)) if pattern == "contiguous" else list(range(0, 2 * blocks, 2))


def raw_key(case: Case, spec: KVCacheSpec, blocks: int) -> RawKey:
    """Raw blocks with the connector's descriptor sizes and adjacency: a gap separates layers."""
    layers, block_len = spec.num_layers, spec.block_bytes_per_layer
    if case.pattern == "contiguous" and case.merge:  # one descriptor per layer
        return RawKey(blocks * block_len, 2 * layers, tuple(range(0, 2 * layers, 2)))
    if case.pattern == "contiguous":  # per-block descriptors, adjacent within a layer
        span = blocks + 1
        ids = [layer * span + b for layer in range(layers) for b in range(blocks)]
        return RawKey(block_len, layers * span, tuple(ids))
    return RawKey(block_len, 2 * layers * blocks, tuple(range(0, 2 * layers * blocks, 2)))


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
    producer: ProducerProcess,
    case: Case,
    iters: int,
    blocks: int,
) -> CaseResult:
    """Time ``iters`` READs through the connector, after one warm-up READ."""
    import torch

    ids = block_ids(case.pattern, blocks)
    tag = f"{case.pattern}-{'merge' if case.merge else 'nomerge'}"
    rids = [f"{tag}-{i}" for i in range(iters + 1)]
    producer.hold(rids)
    for tensor in cache.values():
        tensor.zero_()
    seconds = []
    for rid in rids:
        spec = RecvSpec(
            request_id=rid,
            local_block_ids=(ids,),
            remote_engine_id=PRODUCER_ID,
            remote_host=HOST,
            remote_port=producer.port,
            remote_block_ids=(ids,),
            remote_request_id=rid,
        )
        seconds.append(_read(worker, spec))
    stats = worker.get_kv_connector_stats()
    data = stats.data if isinstance(stats, KVConnectorStats) else {}
    descs = data.get(keys.NUM_DESCRIPTORS, [])
    if not isinstance(descs, list) or len(descs) != len(rids):
        raise RuntimeError(f"connector stats counted {descs!r} descriptor samples")
    phase_ms = {}
    for key in PHASES:
        samples = data.get(key)
        if isinstance(samples, list) and len(samples) == len(rids):
            phase_ms[key] = 1e3 * statistics.median(samples[1:])
    expected = kv_caches(worker.cache_spec, SEED)
    correct = all(torch.equal(cache[name][ids], want[ids]) for name, want in expected.items())
    return CaseResult(tuple(seconds[1:]), int(descs[-1]), phase_ms, correct)


def _raw(key: RawKey, iters: int) -> RawReadResult:
    return run_raw_read(
        key.block_bytes,
        key.num_blocks,
        len(key.block_ids),
        iters,
        block_ids=key.block_ids,
        timeout_s=TIMEOUT_S,
    )


def run(args: argparse.Namespace) -> tuple[list[Row], bool, str]:
    """Each case through the connector, then its raw baseline right after (shared machines
    drift; neighbours in time compare best)."""
    spec = make_spec(args.layers, args.blocks, args.block_kib)
    nbytes = args.blocks * spec.num_layers * spec.block_bytes_per_layer
    producer = ProducerProcess(args.layers, args.blocks, args.block_kib)
    rows: list[Row] = []
    correct = True
    try:
        for merge in (True, False):
            config = nixl_config(
                "kv_consumer", f"bench-consumer-{merge}", merge_contiguous_blocks=merge
            )
            worker = create_connector(config, KVConnectorRole.WORKER, spec)
            cache = kv_caches(spec, None)
            try:
                worker.register_kv_caches(cache)
                for pattern in ("contiguous", "fragmented"):
                    case = Case(pattern, merge)
                    key = raw_key(case, spec, args.blocks)
                    if len(key.block_ids) * key.block_bytes != nbytes:
                        raise RuntimeError(f"raw baseline of {case} moves other bytes")
                    result = run_case(worker, cache, producer, case, args.iters, args.blocks)
                    correct = correct and result.correct
                    rows.append(Row(case, nbytes, result, _raw(key, args.iters)))
            finally:
                worker.shutdown()
    finally:
        released = producer.stop()
    expected = 4 * (args.iters + 1)
    holds = f"producer holds released by done notifications: {released}/{expected}"
    return rows, correct and released == expected, holds


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
    "ratio median",
    "ratio best",
    "connector ms: READ / post / NIXL xfer / confirm",
)


def _cells(row: Row) -> list[str]:
    c = row.connector
    mine = [_gbps(row.nbytes, f(c.seconds)) for f in (statistics.median, min)]
    raw = [_gbps(row.nbytes, f(row.raw.seconds)) for f in (statistics.median, min)]
    phases = [1e3 * statistics.median(c.seconds)] + [c.phase_ms.get(k, 0.0) for k in PHASES]
    return [
        row.case.pattern,
        "on" if row.case.merge else "off",
        f"{row.nbytes / 2**20:.0f}",
        str(c.num_descs),
        str(row.raw.nixl_descs_per_iter),
        f"{mine[0]:.2f} / {mine[1]:.2f}",
        f"{raw[0]:.2f} / {raw[1]:.2f}",
        f"{mine[0] / raw[0]:.2f}",
        f"{mine[1] / raw[1]:.2f}",
        " / ".join(f"{ms:.1f}" for ms in phases),
    ]


def _title(args: argparse.Namespace) -> str:
    return (
        f"NixlConnector READ vs raw NIXL READ, DRAM, two processes ({_nixl_version()}, UCX): "
        f"{args.blocks} blocks x {args.layers} layers x {args.block_kib} KiB per READ, "
        f"{args.iters} READs per case; GB/s as median / best"
    )


def _caption(correct: bool, holds: str) -> str:
    return f"bytes read equal the producer's: {'PASS' if correct else 'FAIL'}; {holds}"


def _table(args: argparse.Namespace, rows: list[Row], correct: bool, holds: str) -> Any:
    from rich.table import Table

    table = Table(title=_title(args), caption=_caption(correct, holds))
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in COLUMNS[:2] else "right")
    for row in rows:
        table.add_row(*_cells(row))
    return table


def _markdown(args: argparse.Namespace, rows: list[Row], correct: bool, holds: str) -> str:
    lines = [_title(args), "", "| " + " | ".join(COLUMNS) + " |", "|---" * len(COLUMNS) + "|"]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    return "\n".join([*lines, "", _caption(correct, holds)])


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    rows, correct, holds = run(args)
    if args.markdown:
        print(_markdown(args, rows, correct, holds))
    else:
        from rich.console import Console

        Console(width=200).print(_table(args, rows, correct, holds))
    return 0 if correct else 1
