"""HTTP routes of `kvbridge serve`: ``/v1/completions``, ``/v1/chat/completions``,
``/v1/models``, ``/health``, ``/metrics``.

Every error, the framework's own included (unknown route 404, wrong method 405), answers in
the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``; see ``service`` for which
request gets which status.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response

from kvbridge.serve.chat import ChatService
from kvbridge.serve.chat_template import ChatTemplate
from kvbridge.serve.completions import CompletionsService
from kvbridge.serve.engine_loop import EngineLoop
from kvbridge.serve.metrics import CONTENT_TYPE, ServerMetrics
from kvbridge.serve.protocol import add_error_handlers, error_response
from kvbridge.serve.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

__all__ = ["ChatService", "CompletionsService", "build_app"]


def build_app(
    loop: EngineLoop,
    tokenizer: Tokenizer,
    metrics: ServerMetrics,
    *,
    model_name: str,
    max_body_bytes: int,
    chat_template: ChatTemplate | None = None,
) -> FastAPI:
    """The server app; it starts ``loop`` on startup and shuts it (and the engine) down on exit."""
    completions = CompletionsService(
        loop, tokenizer, metrics, model_name=model_name, max_body_bytes=max_body_bytes
    )
    chat = ChatService(loop, tokenizer, metrics, model_name=model_name,
                       max_body_bytes=max_body_bytes, template=chat_template)  # fmt: skip

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loop.start()
        try:
            yield
        finally:
            await asyncio.to_thread(loop.shutdown)

    app = FastAPI(title="kvbridge", docs_url=None, redoc_url=None, lifespan=lifespan)
    add_error_handlers(app)

    @app.post("/v1/completions")
    async def completion(request: HttpRequest) -> Response:
        return await completions.handle(request)

    @app.post("/v1/chat/completions")
    async def chat_completion(request: HttpRequest) -> Response:
        return await chat.handle(request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "kvbridge",
                "max_model_len": loop.max_model_len}  # fmt: skip
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> Response:
        if loop.healthy:
            return JSONResponse({"status": "ok"})
        return error_response(503, loop.error or "engine is not running")

    @app.get("/metrics")
    async def prometheus() -> Response:
        await loop.refresh_gauges()
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app
