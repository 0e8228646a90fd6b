"""The reference engine split across two processes, as real engines run.

``SplitEngine`` runs here: the reference ``Scheduler`` (queues and budget over the kit's
``TransferTracker``), the block pool and the connector's scheduler half. ``worker_main`` runs in
a spawned process: the model runner, the KV caches, the reference ``Worker`` and the
connector's worker half. Each step the plan crosses a pipe as msgpack bytes, the connector's
metadata inside it through ``kvbridge.encode_metadata``; the worker's ``ConnectorOutput`` comes
back through ``kvbridge.encode_output``, the start-up handshake through the metadata codec.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import msgspec

import kvbridge
from kvbridge.engine.block_manager import BlockManager
from kvbridge.engine.request import Request, RequestOutput
from kvbridge.engine.sampling import SamplingParams
from kvbridge.engine.scheduler import (
    ScheduledChunk,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
    WorkerOutput,
)

REPLY_TIMEOUT_S = 60.0


class _Chunk(msgspec.Struct, array_like=True):
    request_id: str
    token_ids: list[int]
    start_pos: int
    block_ids: list[int]
    sample: bool
    sampling: SamplingParams


class _Plan(msgspec.Struct):
    step_id: int
    finished_req_ids: list[str]
    chunks: list[_Chunk]
    meta: bytes | None  # kvbridge.encode_metadata


class _Result(msgspec.Struct):
    sampled: dict[str, int]
    output: bytes  # kvbridge.encode_output


class _Start(msgspec.Struct):
    spec: kvbridge.KVCacheSpec
    handshake: bytes | None  # kvbridge.encode_metadata


@dataclass(frozen=True)
class _SampledRequest:
    """What the worker reads of a request: its id and how to sample it."""

    request_id: str
    sampling_params: SamplingParams


def worker_main(conn: Connection, transfer_json: str, num_blocks: int, block_size: int) -> None:
    """The worker process: build the worker, announce it, then run plans until ``b"stop"``."""
    import torch

    from kvbridge.engine.model_config import NAMED_CONFIGS
    from kvbridge.engine.runner import ModelRunner
    from kvbridge.engine.worker import Worker

    runner = ModelRunner(
        NAMED_CONFIGS["tiny"], num_blocks=num_blocks, block_size=block_size, dtype=torch.float32
    )
    transfer = kvbridge.TransferConfig.from_json(transfer_json)
    connector = kvbridge.create_connector(
        transfer, kvbridge.KVConnectorRole.WORKER, runner.cache_spec
    )
    worker = Worker(runner, connector)
    try:
        hs = None if worker.handshake is None else kvbridge.encode_metadata(worker.handshake)
        conn.send_bytes(msgspec.msgpack.encode(_Start(runner.cache_spec, hs)))
        while (payload := conn.recv_bytes()) != b"stop":
            plan = msgspec.msgpack.decode(payload, type=_Plan)
            chunks = tuple(
                ScheduledChunk(
                    _SampledRequest(c.request_id, c.sampling),  # type: ignore[arg-type]
                    c.token_ids,
                    c.start_pos,
                    c.block_ids,
                    c.sample,
                )
                for c in plan.chunks
            )
            meta = None if plan.meta is None else kvbridge.decode_metadata(plan.meta)
            step = kvbridge.SchedulerStep(plan.step_id, (), frozenset(plan.finished_req_ids))
            out = worker.execute(SchedulerOutput(step, chunks, meta))
            wire = kvbridge.encode_output(out.connector_output)
            conn.send_bytes(msgspec.msgpack.encode(_Result(out.sampled_token_ids, wire)))
    finally:
        connector.shutdown()
    conn.send_bytes(b"stopped")


class SplitEngine:
    """Runs in the test process; owns the scheduler side of an engine whose worker runs in a
    spawned process (``worker_main``), and that process."""

    def __init__(
        self,
        transfer: kvbridge.TransferConfig,
        *,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
    ) -> None:
        ctx = mp.get_context("spawn")
        self._conn, theirs = ctx.Pipe()
        args = (theirs, json.dumps(transfer.to_dict()), num_blocks, block_size)
        self.proc = ctx.Process(target=worker_main, args=args, daemon=True)
        self.proc.start()
        theirs.close()
        start = msgspec.msgpack.decode(self._recv(), type=_Start)
        self.spec = start.spec
        self.connector = kvbridge.create_connector(
            transfer, kvbridge.KVConnectorRole.SCHEDULER, self.spec
        )
        if start.handshake is not None:
            handshake = kvbridge.decode_metadata(
                start.handshake, kvbridge.KVConnectorHandshakeMetadata
            )
            self.connector.set_xfer_handshake_metadata({0: handshake})
        self.block_manager = BlockManager(num_blocks, block_size)
        config = SchedulerConfig(
            max_model_len=max_model_len, kv_load_failure_policy=transfer.kv_load_failure_policy
        )
        self.scheduler = Scheduler(config, self.block_manager, self.connector)
        self._hasher = kvbridge.BlockHasher(block_size)
        self._stats: Any = None
        self.num_steps = 0

    def add_request(
        self,
        prompt: list[int],
        params: SamplingParams,
        request_id: str,
        kv_transfer_params: dict[str, Any] | None = None,
    ) -> None:
        request = Request(
            request_id,
            prompt,
            params,
            kv_transfer_params=kv_transfer_params,
            hasher=self._hasher,
        )
        self.scheduler.add_request(request)

    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        chunks = [
            _Chunk(
                c.request_id,
                c.token_ids,
                c.start_pos,
                c.block_ids,
                c.sample,
                c.request.sampling_params,
            )
            for c in sched.chunks
        ]
        meta = (
            None if sched.connector_meta is None else kvbridge.encode_metadata(sched.connector_meta)
        )
        plan = _Plan(sched.step.step_id, sorted(sched.step.finished_req_ids), chunks, meta)
        self._conn.send_bytes(msgspec.msgpack.encode(plan))
        result = msgspec.msgpack.decode(self._recv(), type=_Result)
        output = kvbridge.decode_output(result.output)
        outputs = self.scheduler.update_from_output(sched, WorkerOutput(result.sampled, output))
        self._add_stats(output.stats)
        self._add_stats(self.connector.get_kv_connector_stats())
        self.scheduler.check_integrity()
        self.connector.check_integrity()
        self.num_steps += 1
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def has_pending_transfers(self) -> bool:
        return self.scheduler.has_pending_transfers()

    def take_kv_connector_stats(self) -> Any:
        stats, self._stats = self._stats, None
        return stats

    def shutdown(self) -> int | None:
        """Stop the worker process (its connector half shuts down there), then this half."""
        try:
            if self.proc.is_alive():
                self._conn.send_bytes(b"stop")
                if self._recv() != b"stopped":
                    raise AssertionError("worker process did not stop cleanly")
        finally:
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)
            self.connector.shutdown()
        return self.proc.exitcode

    def _recv(self) -> bytes:
        if not self._conn.poll(REPLY_TIMEOUT_S):
            raise TimeoutError(f"worker process sent nothing within {REPLY_TIMEOUT_S}s")
        return self._conn.recv_bytes()

    def _add_stats(self, stats: Any) -> None:
        if stats is None or stats.is_empty():
            return
        if self._stats is None:
            self._stats = type(stats)()
        self._stats.aggregate(stats)


def wait(condition: Any, poll: Any, timeout_s: float, what: str) -> None:
    """Call ``poll`` until ``condition()`` holds; ``TimeoutError`` naming ``what`` after."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not done within {timeout_s}s")
        poll()
