"""The two processes of ``benchmarks.nixl_modes``: a producer and a consumer ``NixlWorker``.

Producer: registers a seeded Llama-shaped KV cache with its ``kv_buffer_device`` and, told to
hold a request, does what its scheduler half would (a ``SendSpec``); it answers once the lease
is live, with the seconds that took (the stage-out copy to its host buffer when host-staged).
Consumer: loads one request through the connector API (with the handshake, untimed) and reads
its bytes raw once (untimed), then ``iters`` pairs of a load and a raw READ in A B B A order.
A load is timed from ``start_load_kv`` until the request is in ``finished_recving``; a raw READ
moves the same bytes with the same descriptors on the same two agents (the consumer worker's
transport; dlists prepared outside the timing; no notification, lease confirmation or staging).
Every load and raw READ is checked against the seed.
Each process sets its environment (``CUDA_VISIBLE_DEVICES``, UCX) before torch or NIXL start and
sends its output to a log file (UCX prints its protocol tables there).
"""

from __future__ import annotations

import logging
import statistics
import time
import traceback
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, NamedTuple

from kvbridge.bench import harness
from kvbridge.bench.nixl_peer import kv_caches, nixl_config, recv_spec, step_worker
from kvbridge.bench.nixl_raw_reader import prepared_read, timed_read
from kvbridge.connector.base import KVConnectorRole
from kvbridge.connector.factory import create_connector
from kvbridge.connector.stats import KVConnectorStats
from kvbridge.connector.types import KVCacheSpec
from kvbridge.nixl import stats as keys
from kvbridge.nixl.metadata import NixlConnectorMetadata, SendSpec
from kvbridge.nixl.remotes import RemoteEngine
from kvbridge.nixl.worker import NixlWorker

if TYPE_CHECKING:
    import torch

PRODUCER_ID = "modes-producer"
CONSUMER_ID = "modes-consumer"
SEED = 4321
TIMEOUT_S = 120.0
TOKENS_PER_BLOCK, KV_HEADS, HEAD_DIM = 16, 8, 128  # Llama-3-8B: 64 KiB per block-layer in bf16
PHASES = (keys.POST_TIME, keys.XFER_TIME, keys.CONFIRM_TIME, keys.STAGE_IN_TIME)


class Geometry(NamedTuple):
    """The cache both sides register and the request's blocks (the same ids on both sides)."""

    device: str  # "cpu" | "cuda"
    layers: int
    num_blocks: int  # cache size
    block_ids: tuple[int, ...]
    iters: int  # timed loads (and raw reads); one untimed load first (handshake)


class Side(NamedTuple):
    """One process: its ``kv_buffer_device``, environment and log file."""

    kv_buffer_device: str  # "cuda" (direct) | "cpu" (host-staged)
    env: dict[str, str]
    log_path: str
    log_level: str


class LoadSample(NamedTuple):
    stage_out_s: float  # producer: SendSpec to live lease
    load_s: float  # consumer: start_load_kv to finished_recving
    phases_s: dict[str, float]  # connector stats key -> seconds (one READ)
    num_descs: int
    correct: bool


class RawSample(NamedTuple):
    seconds: float  # make + post + poll to DONE + release
    num_descs: int  # descriptors NIXL reported (telemetry), else the plan's
    correct: bool


class ConsumerReport(NamedTuple):
    """What the consumer sends back: the untimed first load, then ``iters`` of each kind."""

    nbytes: int
    memory: str  # what the READ moved, e.g. "VRAM->VRAM"
    first: LoadSample
    loads: list[LoadSample]
    raws: list[RawSample]
    released: int  # producer holds ended by the consumer's "done" notifications


def make_spec(geo: Geometry) -> KVCacheSpec:
    return KVCacheSpec(
        block_size=TOKENS_PER_BLOCK,
        num_blocks=geo.num_blocks,
        num_layers=geo.layers,
        num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        dtype="bfloat16",
    )


def _enter(side: Side, device: str) -> None:
    """A fresh child's environment, output and threads, before torch or NIXL start."""
    harness.enter_child(side.env, side.log_path, side.log_level)
    import torch

    if device == "cpu":
        torch.set_num_threads(1)  # two processes share the cores


def _expect(conn: Connection, kind: str) -> Any:
    return harness.expect(conn, kind, TIMEOUT_S)


def _worker(role: str, engine_id: str, side: Side, spec: KVCacheSpec) -> NixlWorker:
    config = nixl_config(role, engine_id, side.kv_buffer_device, transfer_timeout_s=TIMEOUT_S)
    worker = create_connector(config, KVConnectorRole.WORKER, spec)
    if not isinstance(worker, NixlWorker):
        raise TypeError(f"NixlConnector built a {type(worker).__name__}")
    return worker


# -- producer ------------------------------------------------------------------------------------
def producer_main(conn: Connection, geo: Geometry, side: Side) -> None:
    """Serve the seeded cache; ``("hold", rid)`` -> ``("held", seconds)``; ``("stop", _)``."""
    _enter(side, geo.device)
    spec = make_spec(geo)
    worker = _worker("kv_producer", PRODUCER_ID, side, spec)
    released = 0
    try:
        cache = kv_caches(spec, SEED, geo.device)  # referenced until shutdown: NIXL reads it
        worker.register_kv_caches(cache)
        conn.send(("ready", worker.side_channel_port))
        while True:
            if conn.poll(0.005):  # idle: drain the consumer's notifications every 5 ms
                cmd, rid = conn.recv()
                if cmd == "stop":
                    released += _drain(worker)
                    break
                seconds, ended = _hold(worker, rid, list(geo.block_ids))
                released += ended
                conn.send(("held", seconds))
            released += step_worker(worker, NixlConnectorMetadata(), frozenset())
        conn.send(("stopped", released))
    except Exception:
        logging.getLogger(__name__).exception("producer failed")
        conn.send(("failed", traceback.format_exc()))
    finally:
        worker.shutdown()


def _drain(worker: NixlWorker, timeout_s: float = 2.0) -> int:
    """Step until every lease ended (the last "done" may still be on its way)."""
    ended = 0
    deadline = time.monotonic() + timeout_s
    while worker.leases.num_live and time.monotonic() < deadline:
        ended += step_worker(worker, NixlConnectorMetadata(), frozenset())
    return ended


def _hold(worker: NixlWorker, rid: str, ids: list[int]) -> tuple[float, int]:
    """Hold ``rid``'s blocks as the scheduler's SendSpec would; (seconds to a live lease, ends)."""
    staging = worker.registered.staging
    if staging is not None:  # a stage-out that silently did nothing must not pass the check
        _zero(staging.host_layers)
    send = SendSpec(
        request_id=rid,
        num_blocks=len(ids),
        lease_duration_s=TIMEOUT_S,
        abort_timeout_s=2 * TIMEOUT_S,
        block_ids=(ids,),
    )
    deadline = time.monotonic() + TIMEOUT_S
    start = time.perf_counter()
    ended = step_worker(worker, NixlConnectorMetadata(reqs_to_send={rid: send}), frozenset({rid}))
    while worker.leases.outcome(rid) != "held":
        if time.monotonic() > deadline:
            raise TimeoutError(f"the hold of {rid} never became a live lease")
        ended += step_worker(worker, NixlConnectorMetadata(), frozenset())
    return time.perf_counter() - start, ended


# -- consumer ------------------------------------------------------------------------------------
def consumer_main(conn: Connection, report: Connection, geo: Geometry, side: Side) -> None:
    """Load ``iters + 1`` requests and raw-read ``iters`` times; report, then stop the producer."""
    _enter(side, geo.device)
    result: ConsumerReport | str
    try:
        result = _consume(conn, geo, side)
    except Exception:
        logging.getLogger(__name__).exception("consumer failed")
        result = traceback.format_exc()
    try:
        conn.send(("stop", ""))
        released = _expect(conn, "stopped")
    except Exception:  # the producer failed or died: its error is what counts
        result = result if isinstance(result, str) else traceback.format_exc()
    else:
        if isinstance(result, ConsumerReport):
            result = result._replace(released=released)
    report.send(result)


def _consume(conn: Connection, geo: Geometry, side: Side) -> ConsumerReport:
    port = _expect(conn, "ready")
    spec = make_spec(geo)
    ids = list(geo.block_ids)
    worker = _worker("kv_consumer", CONSUMER_ID, side, spec)
    try:
        cache = kv_caches(spec, None, geo.device)
        worker.register_kv_caches(cache)
        expected = kv_caches(spec, SEED, geo.device)
        local = _local_tensors(worker, cache)
        rids = (f"req-{i}" for i in range(geo.iters + 1))

        def load() -> LoadSample:
            return _load_one(conn, worker, next(rids), port, ids, cache, expected)

        def raw() -> RawSample:
            _zero(local)
            sample = _raw_read(worker, ids)
            return sample._replace(correct=_equal(local, expected, ids))

        first = load()  # untimed: the handshake
        raw()  # untimed: the first READ after others' work runs slow
        loads, raws = harness.abba(load, raw, geo.iters)
        remote = _remote(worker)
        memory = f"{remote.regions.memory_type}->{worker.registered.regions.memory_type}"
        nbytes = len(ids) * spec.num_layers * spec.block_bytes_per_layer
        return ConsumerReport(nbytes, memory, first, loads, raws, released=0)
    finally:
        worker.shutdown()


def _load_one(
    conn: Connection,
    worker: NixlWorker,
    rid: str,
    port: int,
    ids: list[int],
    cache: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
) -> LoadSample:
    _zero(list(cache.values()))
    staging = worker.registered.staging
    if staging is not None:
        _zero(staging.host_layers)
    conn.send(("hold", rid))
    stage_out_s = _expect(conn, "held")
    spec = recv_spec(rid, ids, port, PRODUCER_ID)
    deadline = time.monotonic() + TIMEOUT_S
    start = time.perf_counter()
    worker.bind_connector_metadata(NixlConnectorMetadata(reqs_to_recv={rid: spec}))
    try:
        worker.start_load_kv()
        while rid not in worker.get_finished(frozenset()).recving:
            if time.monotonic() > deadline:
                raise TimeoutError(f"load of {rid} not done in {TIMEOUT_S:g}s")
    finally:
        worker.clear_connector_metadata()
    load_s = time.perf_counter() - start
    if worker.get_block_ids_with_load_errors():
        raise RuntimeError(f"load of {rid} failed: {worker.build_connector_worker_meta()}")
    stats = worker.get_kv_connector_stats()
    data = stats.data if isinstance(stats, KVConnectorStats) else {}
    phases = {k: _one(data.get(k)) for k in PHASES}
    descs = int(_one(data.get(keys.NUM_DESCRIPTORS)))
    ok = _equal(list(cache.values()), expected, ids)
    return LoadSample(stage_out_s, load_s, phases, descs, ok)


def _one(samples: Any) -> float:
    """The sample of one READ (the median if the stats held several)."""
    return float(statistics.median(samples)) if isinstance(samples, list) and samples else 0.0


def _local_tensors(worker: NixlWorker, cache: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """What NIXL writes into on this side: the host buffer when host-staged, else the cache."""
    staging = worker.registered.staging
    return list(staging.host_layers) if staging is not None else list(cache.values())


def _zero(tensors: list[torch.Tensor]) -> None:
    """Zero and wait: NIXL writes GPU memory outside torch's streams."""
    import torch

    for t in tensors:
        t.zero_()
    if any(t.is_cuda for t in tensors):
        torch.cuda.synchronize()


def _equal(got: list[torch.Tensor], expected: dict[str, torch.Tensor], ids: list[int]) -> bool:
    import torch

    index = torch.tensor(ids)
    for have, want in zip(got, expected.values()):
        a = have.index_select(0, index.to(have.device)).flatten(1)  # host rows or cache blocks
        b = want.index_select(0, index.to(want.device)).to(a.device).flatten(1)
        if not torch.equal(a, b):
            return False
    return True


def _remote(worker: NixlWorker) -> RemoteEngine:
    reader = worker.registered.reader
    remote = None if reader is None else reader.engines.get(PRODUCER_ID)
    if remote is None:
        raise RuntimeError("the consumer has not attached the producer")
    return remote


def _raw_read(worker: NixlWorker, ids: list[int]) -> RawSample:
    """One READ of the connector's descriptors on its own transport, nothing around it."""
    reg = worker.registered
    layers = [list(range(len(reg.regions.layer_names)))]
    merge = worker.settings.merge_contiguous_blocks
    with prepared_read(
        reg.transport, reg.regions, reg.local_dlist, _remote(worker), layers, [ids], [ids],
        merge=merge,
    ) as xfer:  # fmt: skip
        sample = timed_read(reg.transport, xfer, TIMEOUT_S, telemetry=True)
    descs = xfer.num_descs if sample.nixl_descs is None else sample.nixl_descs
    return RawSample(sample.seconds, descs, correct=False)
