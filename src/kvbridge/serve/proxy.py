"""PDProxy: the prefill/decode router in front of ``kvbridge serve`` instances (SPEC §3).

Per ``/v1/completions`` or ``/v1/chat/completions`` request: prefill server (round-robin), same
route, with ``kv_transfer_params={"do_remote_decode": true}``, ``max_tokens=1``,
``stream=false`` and none of the fields that only shape the answer (``n``, ``stop``, ...);
then decode server (round-robin) with the original request plus the
``kv_transfer_params`` the prefill server returned; the decode answer (streamed or not) goes
back to the client. A streamed answer whose prefill returned its first token
(``kv_transfer_params.first_token``) starts with that token at once, sent by the proxy; the
decode server's copy of it is cut from its stream (``kvbridge.serve.handover``); a decode
failure then arrives as an error event after that token. The prefill request keeps
``logprobs``/``top_logprobs``, so that token's logprobs come from P.
A prefill that cannot be reached or answers 5xx falls back to the decode
server computing the prompt itself (no params). A 4xx from either server is passed through
unchanged; an unreachable decode server is a 502. ``/v1/models`` is a decode server's.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httpx
import msgspec
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse

from kvbridge.serve.handover import TokenStripper, first_token_chunk, first_token_text
from kvbridge.serve.metrics import CONTENT_TYPE, TTFT_BUCKETS
from kvbridge.serve.protocol import (
    RequestError,
    add_error_handlers,
    error_body,
    error_response,
    read_body,
)

logger = logging.getLogger(__name__)

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
MODELS = "/v1/models"
# Fields the prefill request leaves out: they shape the answer, which the decode server gives.
_ANSWER_ONLY = ("stream_options", "max_completion_tokens", "n", "stop")


def normalise_url(url: str) -> str:
    """``host:port`` or ``http://host:port[/]`` -> ``http://host:port``; errors name the URL."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    try:
        parsed = httpx.URL(text)
    except httpx.InvalidURL:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"server URL {url!r}: expected http://HOST:PORT")
    return text.rstrip("/")


class PDProxy:
    """Runs in the proxy's event loop; owns the HTTP client, the round-robin cursors over the
    prefill and decode servers, and the proxy's metrics."""

    def __init__(
        self,
        prefill_urls: Sequence[str],
        decode_urls: Sequence[str],
        client: httpx.AsyncClient,
        *,
        max_body_bytes: int = 1 << 20,
    ) -> None:
        if not decode_urls:
            raise ValueError("decode: at least one decode server URL is required")
        self.prefill_urls = [normalise_url(u) for u in prefill_urls]
        self.decode_urls = [normalise_url(u) for u in decode_urls]
        self.client = client
        self.max_body_bytes = max_body_bytes
        self._prefill = itertools.cycle(self.prefill_urls) if self.prefill_urls else None
        self._decode = itertools.cycle(self.decode_urls)
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "kvbridge:proxy_requests",
            "proxied requests by route (disaggregated, local_prefill) or error",
            ["route"],
            registry=self.registry,
        )
        self.prefill_failures = Counter(
            "kvbridge:proxy_prefill_failures",
            "prefill attempts that failed and fell back to local prefill on decode",
            registry=self.registry,
        )
        self.handovers = Counter(
            "kvbridge:proxy_first_token_handovers",
            "streamed answers whose first token the proxy sent from the prefill answer",
            registry=self.registry,
        )
        self.prefill_time = Histogram(
            "kvbridge:proxy_prefill_seconds",
            "prefill round trip",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )

    async def handle(self, request: HttpRequest, path: str = COMPLETIONS) -> Response:
        """Route one generation request (``path``: its route) through P, then D."""
        try:
            body = self._parse(await read_body(request, self.max_body_bytes))
        except RequestError as e:
            self.requests.labels(route="rejected").inc()
            return error_response(e.status, e.message, e.param)
        params, answer, early = await self._prefill_step(body, path)
        if early is not None:
            self.requests.labels(route="prefill_error").inc()
            return early
        self.requests.labels(route="disaggregated" if params else "local_prefill").inc()
        decode_body = dict(body)
        if params:
            decode_body["kv_transfer_params"] = params
        url = next(self._decode)
        if body.get("stream") is True:
            first = first_token_chunk(answer, body) if params and answer else None
            if first is not None and answer is not None:
                self.handovers.inc()
                stripper = TokenStripper(first_token_text(answer))
                stream = self._handover_stream(url, path, decode_body, first, stripper)
                return StreamingResponse(stream, media_type="text/event-stream")
            return await self._stream_decode(url, path, decode_body)
        try:
            r = await self.client.post(url + path, json=decode_body)
        except httpx.HTTPError as e:
            return self._unreachable("decode", url, e)
        return _relay(r)

    @staticmethod
    def _parse(raw: bytes) -> dict[str, Any]:
        try:
            # strict JSON (no NaN, no lone surrogates): what the proxy forwards must re-encode
            body = msgspec.json.decode(raw)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
            raise RequestError(400, f"malformed JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError(400, f"request body: expected a JSON object, got {_kind(body)}")
        if "kv_transfer_params" in body:
            raise RequestError(
                400,
                "kv_transfer_params: set by the proxy; send the request without it",
                param="kv_transfer_params",
            )
        return body

    async def _prefill_step(
        self, body: dict[str, Any], path: str
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None, Response | None]:
        """(params for the decode server, or None for local prefill; P's answer; or an error
        to return)."""
        if self._prefill is None:
            return None, None, None
        url = next(self._prefill)
        prefill_body = {k: v for k, v in body.items() if k not in _ANSWER_ONLY}
        prefill_body.update(
            max_tokens=1, stream=False, kv_transfer_params={"do_remote_decode": True}
        )
        try:
            with self.prefill_time.time():
                r = await self.client.post(url + path, json=prefill_body)
        except httpx.HTTPError as e:
            logger.warning("prefill %s unreachable (%s); decode computes the prompt", url, e)
            self.prefill_failures.inc()
            return None, None, None
        if r.status_code >= 500:
            logger.warning("prefill %s answered %d; decode computes the prompt", url, r.status_code)
            self.prefill_failures.inc()
            return None, None, None
        if r.status_code != 200:
            return None, None, _relay(r)
        try:
            answer = r.json()
            params = answer.get("kv_transfer_params")
        except (json.JSONDecodeError, AttributeError):
            answer, params = None, None
        if not isinstance(params, dict) or not params.get("do_remote_prefill"):
            logger.info("prefill %s returned no remote-prefill params; local prefill", url)
            return None, None, None
        return params, answer, None

    async def _stream_decode(self, url: str, path: str, body: dict[str, Any]) -> Response:
        upstream_request = self.client.build_request("POST", url + path, json=body)
        try:
            upstream = await self.client.send(upstream_request, stream=True)
        except httpx.HTTPError as e:
            return self._unreachable("decode", url, e)
        if upstream.status_code != 200:
            await upstream.aread()
            await upstream.aclose()
            return _relay(upstream)
        return StreamingResponse(_pipe(upstream, url), media_type="text/event-stream")

    async def _handover_stream(
        self, url: str, path: str, body: dict[str, Any], first: bytes, stripper: TokenStripper
    ) -> AsyncGenerator[bytes, None]:
        """P's first token at once, then the decode server's stream without its copy of it."""
        yield first
        request = self.client.build_request("POST", url + path, json=body)
        try:
            upstream = await self.client.send(request, stream=True)
        except httpx.HTTPError as e:
            self.requests.labels(route="decode_error").inc()
            message = f"decode server {url} is unreachable: {type(e).__name__}: {e}"
            yield b"data: " + json.dumps(error_body(502, message)).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"
            return
        if upstream.status_code != 200:
            text = (await upstream.aread()).decode(errors="replace")
            await upstream.aclose()
            yield b"data: " + json.dumps(error_body(upstream.status_code, text)).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"
            return
        async for chunk in _pipe(upstream, url):
            out = stripper.feed(chunk)
            if out:
                yield out
        rest = stripper.flush()
        if rest:
            yield rest

    async def models(self) -> Response:
        """A decode server's ``/v1/models`` (P and D serve the same model)."""
        url = next(self._decode)
        try:
            return _relay(await self.client.get(url + MODELS))
        except httpx.HTTPError as e:
            return self._unreachable("decode", url, e)

    def _unreachable(self, role: str, url: str, error: Exception) -> Response:
        self.requests.labels(route=f"{role}_error").inc()
        message = f"{role} server {url} is unreachable: {type(error).__name__}: {error}"
        logger.warning("%s", message)
        return error_response(502, message)


async def _pipe(upstream: httpx.Response, url: str) -> AsyncGenerator[bytes, None]:
    """Relay an SSE stream; a broken upstream ends it with an error event and ``[DONE]``."""
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    except httpx.HTTPError as e:
        message = f"decode server {url} failed mid-stream: {type(e).__name__}"
        logger.warning("%s", message)
        yield b"data: " + json.dumps(error_body(502, message)).encode() + b"\n\ndata: [DONE]\n\n"
    finally:
        await upstream.aclose()


def _relay(r: httpx.Response) -> Response:
    media_type = r.headers.get("content-type", "application/json")
    return Response(r.content, status_code=r.status_code, media_type=media_type)


def _kind(value: object) -> str:
    return {list: "array", str: "string", int: "number", float: "number"}.get(
        type(value), type(value).__name__
    )


def build_proxy_app(
    prefill_urls: Sequence[str],
    decode_urls: Sequence[str],
    *,
    timeout_s: float = 600.0,
    max_body_bytes: int = 1 << 20,
) -> FastAPI:
    """The proxy app; the HTTP client lives for the app's lifetime."""
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_s, connect=10.0),
        trust_env=False,  # never route 127.0.0.1 through an HTTP(S)_PROXY from the environment
        limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
    )
    proxy = PDProxy(prefill_urls, decode_urls, client, max_body_bytes=max_body_bytes)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await client.aclose()

    app = FastAPI(title="kvbridge proxy", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.proxy = proxy
    add_error_handlers(app)

    @app.post(COMPLETIONS)
    async def completions(request: HttpRequest) -> Response:
        return await proxy.handle(request, COMPLETIONS)

    @app.post(CHAT)
    async def chat_completions(request: HttpRequest) -> Response:
        return await proxy.handle(request, CHAT)

    @app.get(MODELS)
    async def models() -> Response:
        return await proxy.models()

    @app.get("/health")
    async def health() -> Response:
        return JSONResponse(
            {"status": "ok", "prefill": proxy.prefill_urls, "decode": proxy.decode_urls}
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(proxy.registry), media_type=CONTENT_TYPE)

    return app
