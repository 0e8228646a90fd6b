"""Generation: the engine requests (one per choice) behind one HTTP request."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import Sequence
from typing import Any

from kvbridge.engine.request import RequestOutput
from kvbridge.engine.sampling import MAX_SEED, SamplingParams
from kvbridge.serve.engine_loop import EngineFailure, EngineLoop, StreamItem
from kvbridge.serve.metrics import ServerMetrics

logger = logging.getLogger(__name__)


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice ``index``'s params: a seeded request's choices use seeds ``seed``, ``seed + 1``,
    ... (as vLLM's), so they differ and each repeats."""
    if params.seed is None or index == 0:
        return params
    return dataclasses.replace(params, seed=(params.seed + index) % (MAX_SEED + 1))


class Generation:
    """Runs in the server's event loop; owns the engine requests of one HTTP request (one per
    choice) and the queue their outputs share.

    - Outputs of all choices come out of ``next`` merged, in the order the engine made them.
    - ``kv_transfer_params`` go with choice 0 only (the others compute their prompt or find it
      in the prefix cache): a remote prefill's blocks are read once.
    - It counts as one request in flight until ``close``, which aborts every engine request that
      has not finished (client gone, an error, an answer nobody read to its end).
    - ``stop(i)`` ends choice i's engine request as a "stop" (a stop string the server found).
    """

    def __init__(
        self,
        loop: EngineLoop,
        metrics: ServerMetrics,
        prompt_ids: list[int],
        params: Sequence[SamplingParams],
        kv_transfer_params: dict[str, Any] | None,
        *,
        id_prefix: str,
    ) -> None:
        self.loop = loop
        self.metrics = metrics
        self.id = f"{id_prefix}-{uuid.uuid4().hex}"
        self.num_prompt_tokens = len(prompt_ids)
        self._queue: asyncio.Queue[StreamItem] = asyncio.Queue()
        n = len(params)
        self.request_ids = [self.id if n == 1 else f"{self.id}-{i}" for i in range(n)]
        self._index = {rid: i for i, rid in enumerate(self.request_ids)}  # request id -> choice
        self._open: set[int] = set()  # choices whose engine request may still run
        self._closed = False
        for i, (rid, p) in enumerate(zip(self.request_ids, params, strict=True)):
            try:
                kv = kv_transfer_params if i == 0 else None
                loop.submit(prompt_ids, p, kv, request_id=rid, outputs=self._queue)
            except BaseException:
                self._abort_open()
                raise
            self._open.add(i)
        metrics.in_flight.inc()

    async def next(self) -> tuple[int, RequestOutput] | EngineFailure:
        """The next output, with its choice index; or a failure, which ends the request."""
        item = await self._queue.get()
        if isinstance(item, EngineFailure):
            return item
        return self._index[item.request_id], item

    def done(self, index: int) -> None:
        """Choice ``index``'s engine request finished: nothing to abort."""
        self._open.discard(index)

    def stop(self, index: int) -> None:
        """End choice ``index``'s engine request, counted as a "stop"."""
        if index in self._open:
            self._open.discard(index)
            self.loop.abort(self.request_ids[index], stopped=True)

    def close(self) -> None:
        """Abort what still runs; no longer in flight. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.metrics.in_flight.dec()
        if self._open:
            logger.info("answer abandoned; aborting %s", self.id)
        self._abort_open()

    def _abort_open(self) -> None:
        for i in sorted(self._open):
            self.loop.abort(self.request_ids[i])
        self._open.clear()
