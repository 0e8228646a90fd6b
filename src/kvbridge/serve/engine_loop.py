"""EngineLoop: the one thread that calls into an ``LLMEngine`` on behalf of the HTTP server."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kvbridge.connector.gauges import LabelledGauges, connector_gauges
from kvbridge.connector.stats import KVConnectorStats, MultiKVConnectorStats
from kvbridge.engine.engine import LLMEngine
from kvbridge.engine.request import RequestOutput
from kvbridge.engine.sampling import SamplingParams
from kvbridge.serve.metrics import ServerMetrics
from kvbridge.serve.protocol import RequestError

logger = logging.getLogger(__name__)

# Between steps that compute nothing (a load in flight, blocks held for a remote reader) the
# thread waits for commands 0.1 ms, doubling up to this cap: no busy spin.
IDLE_WAIT_MAX_S = 0.005

T = TypeVar("T")


@dataclass(frozen=True)
class EngineFailure:
    """Ends a request's stream with an HTTP error instead of an output."""

    status: int
    message: str


StreamItem = RequestOutput | EngineFailure


@dataclass
class RequestHandle:
    """One submitted request: its id and the asyncio queue its outputs arrive on."""

    request_id: str
    num_prompt_tokens: int
    remote_prefill: bool
    queue: asyncio.Queue[StreamItem]
    loop: asyncio.AbstractEventLoop
    arrival: float = field(default_factory=time.monotonic)
    saw_first_token: bool = False
    stopped: bool = False  # ended by the server (a stop string): counted as a "stop" finish

    def push(self, item: StreamItem) -> None:
        """Hand ``item`` to the event loop (called from the engine thread)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            logger.debug("dropping output for %s: event loop closed", self.request_id)

    async def stream(self) -> AsyncIterator[StreamItem]:
        """Outputs until the final one (or a failure)."""
        while True:
            item = await self.queue.get()
            yield item
            if isinstance(item, EngineFailure) or item.finished:
                return


@dataclass(frozen=True)
class _Add:
    handle: RequestHandle
    prompt_token_ids: list[int]
    params: SamplingParams
    kv_transfer_params: dict[str, Any] | None


@dataclass(frozen=True)
class _Abort:
    request_id: str
    stopped: bool


@dataclass(frozen=True)
class _Call:
    fn: Callable[[LLMEngine], Any]
    result: Future[Any]


class _Stop:
    pass


_Command = _Add | _Abort | _Call | _Stop


class EngineLoop:
    """Runs a background thread; owns the ``LLMEngine`` and is its only caller.

    - Requests arrive through a thread-safe queue; outputs go back through each request's
      asyncio queue (``call_soon_threadsafe``).
    - The thread steps while the engine has work and blocks on the queue when it has none.
    - An engine error fails every open request (500) and marks the loop unhealthy.
    """

    def __init__(self, engine: LLMEngine, metrics: ServerMetrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        transfer = engine.config.kv_transfer_config
        self.connector_name = transfer.kv_connector if transfer is not None else "none"
        self._commands: queue.Queue[_Command] = queue.Queue()
        self._handles: dict[str, RequestHandle] = {}  # engine thread only: id -> open request
        self._lock = threading.Lock()  # guards _closed against submit()
        self._closed = False
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="kvbridge-engine", daemon=True)

    # -- event-loop side ------------------------------------------------------------------------
    def start(self) -> None:
        """Start the thread (once; later calls do nothing)."""
        if self._thread.ident is None:
            self._thread.start()

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def submit(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        kv_transfer_params: dict[str, Any] | None = None,
        *,
        request_id: str | None = None,
        outputs: asyncio.Queue[StreamItem] | None = None,
    ) -> RequestHandle:
        """Queue a request (call from the event loop); its outputs arrive on the handle's queue
        (``outputs`` when given: several requests can share one)."""
        handle = RequestHandle(
            request_id=request_id or f"cmpl-{uuid.uuid4().hex}",
            num_prompt_tokens=len(prompt_token_ids),
            remote_prefill=bool((kv_transfer_params or {}).get("do_remote_prefill")),
            queue=outputs if outputs is not None else asyncio.Queue(),
            loop=asyncio.get_running_loop(),
        )
        with self._lock:
            if self._closed:
                raise RequestError(503, self.error or "server is shutting down")
            self._commands.put(_Add(handle, prompt_token_ids, params, kv_transfer_params))
        return handle

    def abort(self, request_id: str, *, stopped: bool = False) -> None:
        """Ask the engine to end a request (client gone; ``stopped``: the server found a stop
        string, and the finish counts as a "stop"); safe from any thread."""
        self._commands.put(_Abort(request_id, stopped))

    def call(self, fn: Callable[[LLMEngine], T], timeout_s: float = 30.0) -> T:
        """Run ``fn(engine)`` in the engine thread and return its result (blocks the caller:
        never call it from the event loop). For checks such as ``check_integrity``."""
        result: T = self._submit(fn).result(timeout_s)
        return result

    def _submit(self, fn: Callable[[LLMEngine], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError(self.error or "engine loop is closed")
            self._commands.put(_Call(fn, future))
        return future

    async def refresh_gauges(self, timeout_s: float = 1.0) -> None:
        """Have the engine thread set the gauges now (call from the event loop). Steps set them
        too, but an idle engine's connector can still change (a producer found gone is
        detached); an engine thread that does not answer in ``timeout_s`` leaves the last."""
        metrics = self.metrics
        if metrics is None or not self.healthy:
            return
        try:
            # awaited on the event loop: no executor thread that would outlive the scrape
            done = asyncio.wrap_future(self._submit(lambda _: self._record_gauges(metrics)))
            await asyncio.wait_for(done, timeout_s)
        except (RuntimeError, TimeoutError) as e:
            logger.debug("gauges not refreshed: %s", e or type(e).__name__)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Fail open requests, stop the thread, shut the engine down. Idempotent."""
        self._commands.put(_Stop())
        if self._thread.is_alive():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning("engine thread did not stop within %.1fs", timeout_s)
                return
        self.engine.shutdown()

    # -- engine thread --------------------------------------------------------------------------
    def _run(self) -> None:
        idle_wait = 0.0  # grows while steps find nothing to compute (a load or a send in flight)
        try:
            while True:
                busy = self.engine.has_unfinished_requests()
                if not (busy or self.engine.has_pending_transfers()):
                    idle_wait = 0.0
                    wait: float | None = None  # nothing to do: sleep until a command comes
                else:
                    wait = idle_wait
                if self._apply_commands(wait):
                    break
                if self.engine.has_unfinished_requests() or self.engine.has_pending_transfers():
                    computed = self._step() or bool(self.engine.scheduler.running)
                    idle_wait = 0.0 if computed else min(IDLE_WAIT_MAX_S, 2 * idle_wait or 1e-4)
        except Exception as e:
            logger.exception("engine loop failed")
            self.error = f"engine failed: {type(e).__name__}: {e}"
        self._close(self.error or "server is shutting down")

    def _apply_commands(self, wait: float | None) -> bool:
        """Apply queued commands, first waiting up to ``wait`` s (None: forever); True = stop."""
        try:
            if wait is not None and wait <= 0.0:
                command = self._commands.get_nowait()
            else:
                command = self._commands.get(timeout=wait)
        except queue.Empty:
            return False
        while True:
            if isinstance(command, _Stop):
                return True
            if isinstance(command, _Add):
                self._add(command)
            elif isinstance(command, _Abort):
                self._abort(command.request_id, command.stopped)
            else:
                self._call(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return False

    def _add(self, cmd: _Add) -> None:
        handle = cmd.handle
        try:
            self.engine.add_request(
                cmd.prompt_token_ids,
                cmd.params,
                request_id=handle.request_id,
                kv_transfer_params=cmd.kv_transfer_params,
            )
        except ValueError as e:
            handle.push(EngineFailure(400, str(e)))
            return
        self._handles[handle.request_id] = handle

    def _abort(self, request_id: str, stopped: bool) -> None:
        handle = self._handles.get(request_id)
        if handle is None:
            return
        handle.stopped = stopped
        if not self.engine.abort_request(request_id):
            self._handles.pop(request_id, None)  # already finished: no final output will come

    def _call(self, cmd: _Call) -> None:
        try:
            cmd.result.set_result(cmd.fn(self.engine))
        except Exception as e:  # handed to the caller
            cmd.result.set_exception(e)

    def _step(self) -> bool:
        """One engine step; ``True`` if it produced outputs. Metrics are updated before the
        outputs go out, so a client that got its answer sees them in ``/metrics``."""
        outputs = self.engine.step()
        ready: list[tuple[RequestHandle, RequestOutput]] = []
        for out in outputs:
            handle = self._handles.get(out.request_id)
            if handle is None:
                continue
            if out.finished:
                del self._handles[out.request_id]
            self._observe(handle, out)
            ready.append((handle, out))
        self._record_engine_metrics()
        for handle, out in ready:
            handle.push(out)
        return bool(outputs)

    def _observe(self, handle: RequestHandle, out: RequestOutput) -> None:
        if self.metrics is None:
            return
        if out.token_ids and not handle.saw_first_token:
            handle.saw_first_token = True
            self.metrics.observe_first_token(out.ttft)
        if out.finished:
            self.metrics.observe_finished(
                finish_reason="stop" if handle.stopped else out.finish_reason,
                num_prompt_tokens=handle.num_prompt_tokens,
                num_generated=len(out.token_ids),
                num_cached=out.num_cached_tokens,
                num_external=out.num_external_tokens,
                remote=handle.remote_prefill,
                e2e_seconds=time.monotonic() - handle.arrival,
            )

    def _record_engine_metrics(self) -> None:
        if self.metrics is None:
            return
        stats: KVConnectorStats | MultiKVConnectorStats | None = (
            self.engine.take_kv_connector_stats()
        )
        self.metrics.record_connector_stats(stats, name=self.connector_name)
        self._record_gauges(self.metrics)

    def _record_gauges(self, metrics: ServerMetrics) -> None:
        sched, blocks = self.engine.scheduler, self.engine.block_manager
        held = [rid for rid, r in sched.requests.items() if r.is_finished]
        metrics.set_gauges(
            {
                "num_requests_running": len(sched.running),
                "num_requests_waiting": len(sched.waiting),
                "num_free_gpu_blocks": blocks.num_free_blocks,
                "num_requests_holding_blocks": len(held),
                "num_blocks_held_by_connector": sum(len(blocks.block_ids(r)) for r in held),
            }
        )
        metrics.set_connector_gauges(self.connector_gauges())

    def connector_gauges(self) -> LabelledGauges:
        """Both connector halves' gauges by connector label (call in the engine thread)."""
        e = self.engine
        return connector_gauges(self.connector_name, e.scheduler_connector, e.worker_connector)

    def _close(self, reason: str) -> None:
        """Fail every open or queued request; later ``submit`` calls get 503."""
        status = 500 if self.error else 503
        with self._lock:
            self._closed = True
        for handle in self._handles.values():
            handle.push(EngineFailure(status, reason))
        self._handles.clear()
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, _Add):
                command.handle.push(EngineFailure(status, reason))
            elif isinstance(command, _Call):
                command.result.set_exception(RuntimeError(reason))
