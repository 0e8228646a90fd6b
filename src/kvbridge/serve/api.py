"""HTTP routes of `kvbridge serve`: `/v1/completions`, `/v1/models`, `/health`, `/metrics`.

Errors: a malformed or ill-typed body, an unknown field (top level or in
``kv_transfer_params``), an empty or oversize prompt, a token id outside the vocab -> 400 (never
422: one status for every invalid body, as OpenAI and vLLM answer); wrong ``model`` -> 404; a
body over ``max_body_bytes`` -> 413; an engine failure -> 500; shutting down -> 503. Every error
body is ``{"error": {"message", "type", "code"}}`` with a message naming the field. A streamed
request answers its status once the first token (or the failure) is known. A client that
disconnects gets its request aborted in the engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from kvbridge.engine.request import RequestOutput
from kvbridge.engine.sampling import SamplingParams
from kvbridge.serve.engine_loop import EngineFailure, EngineLoop, RequestHandle, StreamItem
from kvbridge.serve.metrics import CONTENT_TYPE, ServerMetrics
from kvbridge.serve.protocol import (
    CompletionRequest,
    RequestError,
    decode_completion_request,
    error_body,
    error_response,
    read_body,
)
from kvbridge.serve.tokenizer import IncrementalDecoder, Tokenizer

logger = logging.getLogger(__name__)

# finish_reason -> HTTP status for requests the engine ended without generating normally.
_FAILED_FINISH = {"rejected": 400, "error": 500, "abort": 503}

T = TypeVar("T")


class CompletionsService:
    """Runs in the server's event loop; turns HTTP requests into engine requests and back."""

    def __init__(
        self,
        loop: EngineLoop,
        tokenizer: Tokenizer,
        metrics: ServerMetrics,
        *,
        model_name: str,
        max_body_bytes: int,
    ) -> None:
        self.loop = loop
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.model_name = model_name
        self.max_body_bytes = max_body_bytes

    async def handle(self, request: HttpRequest) -> Response:
        try:
            body = await read_body(request, self.max_body_bytes)
            req = decode_completion_request(body)
            prompt_ids = self._prompt_ids(req)
            handle = self.loop.submit(prompt_ids, self._sampling(req), self._kv_params(req))
        except RequestError as e:
            self.metrics.rejected.labels(status=str(e.status)).inc()
            return error_response(e.status, e.message)
        tracker = _OpenRequest(self.loop, self.metrics, handle.request_id)
        stream = handle.stream()
        streaming: StreamingResponse | None = None
        try:
            # Stream: wait for the first token (an early failure still gets its HTTP status).
            first = anext(stream) if req.stream else _last(stream)
            item = await _unless_disconnected(request, first)
            tracker.finished = isinstance(item, EngineFailure) or item.finished
            failure = _failure(item)
            if failure is not None:
                self.metrics.rejected.labels(status=str(failure.status)).inc()
                return error_response(failure.status, failure.message)
            if not isinstance(item, RequestOutput):
                raise TypeError(f"unexpected stream item {item!r}")
            if not req.stream:
                return JSONResponse(self._final_body(handle, item, len(prompt_ids)))
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            items = _chain(item, stream)
            events = self._events(handle, items, tracker, len(prompt_ids), include_usage)
            streaming = _ClosingStream(events, on_close=tracker.close)
            return streaming
        except _ClientGone:
            return Response(status_code=499)
        finally:
            if streaming is None:
                tracker.close()

    # -- request -> engine ----------------------------------------------------------------------
    def _prompt_ids(self, req: CompletionRequest) -> list[int]:
        if req.model is not None and req.model != self.model_name:
            raise RequestError(404, f"model: {req.model!r} is not served here ({self.model_name})")
        ids = self.tokenizer.encode(req.prompt) if isinstance(req.prompt, str) else req.prompt
        limit = self.loop.max_model_len
        if len(ids) > limit:
            raise RequestError(
                400, f"prompt: {len(ids)} tokens, more than this server holds ({limit} tokens)"
            )
        return ids

    @staticmethod
    def _sampling(req: CompletionRequest) -> SamplingParams:
        try:
            return SamplingParams(
                max_tokens=req.max_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                seed=req.seed,
                stop_token_ids=tuple(req.stop_token_ids or ()),
                ignore_eos=req.ignore_eos,
            )
        except ValueError as e:
            raise RequestError(400, str(e)) from None

    @staticmethod
    def _kv_params(req: CompletionRequest) -> dict[str, Any] | None:
        return None if req.kv_transfer_params is None else req.kv_transfer_params.to_dict()

    # -- engine -> response ---------------------------------------------------------------------
    def _final_body(
        self, handle: RequestHandle, out: RequestOutput, num_prompt: int
    ) -> dict[str, Any]:
        choice = self._choice(out.token_ids, self.tokenizer.decode(out.token_ids), out)
        body = self._envelope(handle, [choice])
        body["usage"] = _usage(num_prompt, out)
        body["kv_transfer_params"] = out.kv_transfer_params
        return body

    async def _events(
        self,
        handle: RequestHandle,
        items: AsyncIterator[StreamItem],
        tracker: _OpenRequest,
        num_prompt: int,
        include_usage: bool,
    ) -> AsyncGenerator[bytes, None]:
        decoder = IncrementalDecoder(self.tokenizer)
        sent = 0
        async for item in items:
            failure = _failure(item)
            if failure is not None:
                tracker.finished = True
                self.metrics.rejected.labels(status=str(failure.status)).inc()
                yield _sse(error_body(failure.status, failure.message))
                break
            if not isinstance(item, RequestOutput):
                raise TypeError(f"unexpected stream item {item!r}")
            new_ids, sent = item.token_ids[sent:], len(item.token_ids)
            if not new_ids and not item.finished:
                continue
            text = decoder.add(new_ids, final=item.finished)
            chunk = self._envelope(handle, [self._choice(new_ids, text, item)])
            if item.finished:
                tracker.finished = True
                chunk["kv_transfer_params"] = item.kv_transfer_params
            yield _sse(chunk)
            if item.finished and include_usage:
                usage = self._envelope(handle, [])
                usage["usage"] = _usage(num_prompt, item)
                yield _sse(usage)
        yield b"data: [DONE]\n\n"

    def _envelope(self, handle: RequestHandle, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": handle.request_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
        }

    @staticmethod
    def _choice(token_ids: list[int], text: str, out: RequestOutput) -> dict[str, Any]:
        return {
            "index": 0,
            "text": text,
            "token_ids": token_ids,
            "logprobs": None,
            "finish_reason": out.finish_reason if out.finished else None,
        }


def _failure(item: StreamItem) -> EngineFailure | None:
    """The error a stream item stands for: an engine failure, or an abnormal finish."""
    if isinstance(item, EngineFailure):
        return item
    status = _FAILED_FINISH.get(item.finish_reason or "")
    if item.finished and status is not None:
        return EngineFailure(status, item.error or f"request ended: {item.finish_reason}")
    return None


def _usage(num_prompt: int, out: RequestOutput) -> dict[str, Any]:
    return {
        "prompt_tokens": num_prompt,
        "completion_tokens": len(out.token_ids),
        "total_tokens": num_prompt + len(out.token_ids),
        "prompt_tokens_details": {
            "cached_tokens": out.num_cached_tokens,
            "external_tokens": out.num_external_tokens,
        },
    }


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class _OpenRequest:
    """An engine request the server still answers: counted in flight, aborted unless it ended."""

    def __init__(self, loop: EngineLoop, metrics: ServerMetrics, request_id: str) -> None:
        self.loop = loop
        self.metrics = metrics
        self.request_id = request_id
        self.finished = False
        self._closed = False
        metrics.in_flight.inc()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.metrics.in_flight.dec()
        if not self.finished:
            logger.info("client left; aborting %s", self.request_id)
            self.loop.abort(self.request_id)


class _ClosingStream(StreamingResponse):
    """An SSE response that calls ``on_close`` however it ends (done, disconnect, error), even
    if the body was never iterated."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


class _ClientGone(Exception):
    """The client disconnected while the server waited for the engine."""


async def _unless_disconnected(request: HttpRequest, awaitable: Awaitable[T]) -> T:
    """Await ``awaitable``; if the client disconnects first, cancel it and raise _ClientGone."""
    work = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_wait_disconnect(request))
    await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if not work.done():
        work.cancel()
        raise _ClientGone
    return work.result()


async def _chain(first: StreamItem, rest: AsyncIterator[StreamItem]) -> AsyncIterator[StreamItem]:
    yield first
    if isinstance(first, EngineFailure) or first.finished:
        return
    async for item in rest:
        yield item


async def _last(stream: AsyncIterator[StreamItem]) -> StreamItem:
    last: StreamItem | None = None
    async for item in stream:
        last = item
    if last is None:
        return EngineFailure(500, "the engine ended the request without an output")
    return last


async def _wait_disconnect(request: HttpRequest) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def build_app(
    loop: EngineLoop,
    tokenizer: Tokenizer,
    metrics: ServerMetrics,
    *,
    model_name: str,
    max_body_bytes: int,
) -> FastAPI:
    """The server app; it starts ``loop`` on startup and shuts it (and the engine) down on exit."""
    service = CompletionsService(
        loop, tokenizer, metrics, model_name=model_name, max_body_bytes=max_body_bytes
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loop.start()
        try:
            yield
        finally:
            await asyncio.to_thread(loop.shutdown)

    app = FastAPI(title="kvbridge", docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest) -> Response:
        return await service.handle(request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model"}]}

    @app.get("/health")
    async def health() -> Response:
        if loop.healthy:
            return JSONResponse({"status": "ok"})
        return error_response(503, loop.error or "engine is not running")

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.exception_handler(Exception)
    async def unexpected(_: HttpRequest, exc: Exception) -> Response:
        logger.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}")

    return app
