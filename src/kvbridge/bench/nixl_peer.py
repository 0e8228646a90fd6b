"""The producer side of ``kvbridge bench nixl``: a real ``NixlWorker`` in its own process.

It registers a seeded KV cache (so the consumer can check the bytes it read), holds the
requests it is told to under leases, as its scheduler half would, and drains the consumer's
notifications every 50 ms while idle.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import time
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from kvbridge.bench.harness import expect, reap, spawn
from kvbridge.config import TransferConfig
from kvbridge.connector.base import KVConnectorRole, KVConnectorWorker
from kvbridge.connector.factory import create_connector
from kvbridge.connector.types import KVCacheSpec
from kvbridge.nixl.metadata import NixlConnectorMetadata, RecvSpec, SendSpec, blocks_digest

if TYPE_CHECKING:
    import torch

PRODUCER_ID = "bench-producer"
HOST = "127.0.0.1"
TOKENS_PER_BLOCK = 16
KV_HEADS = 8
SEED = 1234
TIMEOUT_S = 60.0


def make_spec(layers: int, blocks: int, block_kib: int) -> KVCacheSpec:
    """A float32 blocks-first cache of ``2 * blocks`` blocks (room for every-other ids)."""
    head_dim = block_kib * 1024 // (2 * TOKENS_PER_BLOCK * KV_HEADS * 4)
    return KVCacheSpec(
        block_size=TOKENS_PER_BLOCK,
        num_blocks=2 * blocks,
        num_layers=layers,
        num_kv_heads=KV_HEADS,
        head_dim=head_dim,
        dtype="float32",
    )


def kv_caches(spec: KVCacheSpec, seed: int | None, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Per-layer caches of ``spec.dtype`` on ``device``: seeded random values, or zeros when
    ``seed`` is None."""
    import torch

    shape = (spec.num_blocks, 2, spec.block_size, spec.num_kv_heads, spec.head_dim)
    dtype = getattr(torch, spec.dtype)
    out = {}
    for i in range(spec.num_layers):
        if seed is None:
            out[f"layers.{i}"] = torch.zeros(shape, dtype=dtype, device=device)
        else:
            gen = torch.Generator(device=device).manual_seed(seed + i)
            out[f"layers.{i}"] = torch.randn(shape, generator=gen, dtype=dtype, device=device)
    return out


def nixl_config(
    role: str, engine_id: str, kv_buffer_device: str = "cuda", **extra: Any
) -> TransferConfig:
    """A NixlConnector on loopback, side channel on a free port; ``extra`` goes to its extra
    config (over the defaults)."""
    return TransferConfig.from_dict(
        {
            "kv_connector": "NixlConnector",
            "kv_role": role,
            "engine_id": engine_id,
            "kv_buffer_device": kv_buffer_device,
            "kv_connector_extra_config": {
                "side_channel_host": HOST,
                "side_channel_port": 0,
                "transfer_timeout_s": TIMEOUT_S,
                **extra,
            },
        }
    )


def recv_spec(rid: str, ids: list[int], port: int, engine_id: str = PRODUCER_ID) -> RecvSpec:
    """A load of blocks ``ids`` of a bench producer's request ``rid`` into the same ids (the
    producer holds exactly ``ids``: ``ProducerProcess.hold``)."""
    return RecvSpec(
        request_id=rid,
        local_block_ids=(ids,),
        remote_engine_id=engine_id,
        remote_host=HOST,
        remote_port=port,
        remote_block_ids=(ids,),
        remote_request_id=rid,
        remote_blocks_digest=blocks_digest((ids,)),
    )


def step_worker(
    worker: KVConnectorWorker, meta: NixlConnectorMetadata, finished: frozenset[str]
) -> int:
    """One worker step outside an engine: bind, start loads, poll; returns finished sends."""
    worker.bind_connector_metadata(meta)
    try:
        worker.start_load_kv()
        sending, _ = worker.get_finished(finished)
    finally:
        worker.clear_connector_metadata()
    return len(sending)


def cpu_seconds() -> float:
    """CPU time of this process (every thread: NIXL's progress thread too), user + system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def producer_main(
    conn: Connection, layers: int, blocks: int, block_kib: int, extra: dict[str, Any]
) -> None:
    """Serve a seeded KV cache; hold requests on ``("hold", (ids, block ids))``; report on
    ``("stop",)``.

    ``("released",)`` steps the worker once more and answers how many holds are released;
    ``("cpu",)`` answers ``(cpu seconds, wall seconds)`` so far; ``("mute", seconds)`` keeps
    the side channel from answering lease questions for that long (a producer whose Python
    threads are slow: a lease question asked meanwhile is answered late). ``extra``:
    connector config.
    """
    spec = make_spec(layers, blocks, block_kib)
    config = nixl_config("kv_producer", PRODUCER_ID, **extra)
    worker = create_connector(config, KVConnectorRole.WORKER, spec)
    released = 0
    try:
        cache = kv_caches(spec, SEED)  # referenced until shutdown: NIXL reads this memory
        worker.register_kv_caches(cache)
        conn.send(("ready", getattr(worker, "side_channel_port", None)))
        while True:
            meta, finished = NixlConnectorMetadata(), frozenset[str]()
            if conn.poll(0.05):  # idle: drain the consumer's notifications every 50 ms
                cmd, args = conn.recv()
                if cmd == "stop":
                    break
                if cmd == "cpu":
                    conn.send(("cpu", (cpu_seconds(), time.perf_counter())))
                    continue
                if cmd == "mute":
                    _mute_lease_answers(worker, time.monotonic() + float(args))
                    conn.send(("muted", args))
                    continue
                if cmd == "released":
                    released += step_worker(worker, meta, finished)
                    conn.send(("released", released))
                    continue
                ids, held = args
                meta.reqs_to_send = {
                    rid: SendSpec(
                        request_id=rid,
                        num_blocks=len(held),
                        lease_duration_s=TIMEOUT_S,
                        abort_timeout_s=2 * TIMEOUT_S,
                        block_ids=(list(held),),
                    )
                    for rid in ids
                }
                finished = frozenset(ids)
                conn.send(("held", len(ids)))
            released += step_worker(worker, meta, finished)
        conn.send(("stopped", released))
    finally:
        worker.shutdown()


def _mute_lease_answers(worker: KVConnectorWorker, until: float) -> None:
    """Hold back the worker's lease answers (its side-channel thread waits) until ``until``."""
    leases = getattr(worker, "leases", None)
    if leases is None:
        raise TypeError(f"{type(worker).__name__} keeps no leases")
    status = type(leases).status

    def late(request_id: str, now: float | None) -> Any:
        time.sleep(max(0.0, until - time.monotonic()))
        return status(leases, request_id, now)

    leases.status = late


class ProducerProcess:
    """Runs in the bench process; owns the producer process and the pipe to it."""

    def __init__(
        self, layers: int, blocks: int, block_kib: int, extra: dict[str, Any] | None = None
    ) -> None:
        self.conn, theirs = mp.Pipe()
        self.proc = spawn(producer_main, theirs, layers, blocks, block_kib, extra or {})
        theirs.close()
        try:
            port = expect(self.conn, "ready", TIMEOUT_S)
            if not isinstance(port, int) or port <= 0:
                raise RuntimeError(f"producer reported no side-channel port ({port!r})")
        except BaseException:
            self.proc.kill()
            raise
        self.port = port

    def hold(self, ids: list[str], block_ids: list[int]) -> None:
        """Hold ``block_ids`` for each request of ``ids`` (as its scheduler half would)."""
        self.conn.send(("hold", (ids, block_ids)))
        expect(self.conn, "held", TIMEOUT_S)

    def mute(self, seconds: float) -> None:
        """The producer answers no lease question for ``seconds`` from now."""
        self.conn.send(("mute", seconds))
        expect(self.conn, "muted", TIMEOUT_S)

    def cpu(self) -> tuple[float, float]:
        """The producer's (CPU seconds, wall seconds) so far: differences give its load."""
        self.conn.send(("cpu", []))
        cpu_s, wall_s = expect(self.conn, "cpu", TIMEOUT_S)
        return float(cpu_s), float(wall_s)

    def wait_released(self, expected: int, timeout_s: float = 5.0) -> int:
        """How many holds are released, once ``expected`` are or after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.conn.send(("released", []))
            released: int = expect(self.conn, "released", TIMEOUT_S)
            if released >= expected or time.monotonic() > deadline:
                return released
            time.sleep(0.01)

    def stop(self) -> int:
        """Stop it; returns how many holds the consumer's done notifications released."""
        try:
            self.conn.send(("stop", []))
            released: int = expect(self.conn, "stopped", TIMEOUT_S)
            return released
        finally:
            reap([self.proc], 10)
