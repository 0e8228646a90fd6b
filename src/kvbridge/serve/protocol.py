"""Wire types shared by the OpenAI-style routes, ``/v1/completions``'s request, and errors.

Decoding is strict: unknown fields (top level or inside ``kv_transfer_params``) and wrong types
are errors whose message names the field, e.g. ``Object contains unknown field `foo` - at
`$.kv_transfer_params```, and whose ``param`` is that field's path (``kv_transfer_params.foo``).
The server answers every such error with HTTP 400. Optional OpenAI fields may be ``null``.

Errors have the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``: ``type`` is
``invalid_request_error`` for a 4xx and ``server_error`` for a 5xx; ``code`` is the HTTP status
(as vLLM sends it; clients read the status from the response).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import msgspec
from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response

logger = logging.getLogger(__name__)

# An oversize body is read (and dropped) up to this many times the limit before the 413 goes
# out, so the client sees the answer instead of a reset connection.
_DRAIN_FACTOR = 64
MAX_N = 16  # choices per request
DEFAULT_COMPLETION_TOKENS = 16  # /v1/completions without max_tokens (the OpenAI default)

_AT = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_UNKNOWN = re.compile(r"unknown field `(?P<name>[^`]+)`")


class RequestError(Exception):
    """A request the server refuses; ``status`` is the HTTP code, ``message`` says why and
    ``param`` is the offending field's path (``messages[0].role``) when there is one."""

    def __init__(self, status: int, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


class FirstTokenParams(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """``kv_transfer_params.first_token``: the token a prefill server sampled (SPEC §3)."""

    token_id: int
    logprob: float | None = None
    rank: int | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    prompt_hash: str | None = None


class KVTransferParams(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """P/D hand-off fields (SPEC §3); only the fields a client set are passed on."""

    do_remote_decode: bool = False
    do_remote_prefill: bool = False
    remote_engine_id: str | None = None
    remote_host: str | None = None
    remote_port: int | None = None
    remote_block_ids: list[Any] | None = None
    remote_request_id: str | None = None
    tp_size: int | None = None
    first_token: FirstTokenParams | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = msgspec.to_builtins(self)
        return out


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    """OpenAI-style stream options of a completion request."""

    include_usage: bool = False


class GenerationRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The fields ``/v1/completions`` and ``/v1/chat/completions`` share."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None  # None: 1.0, the OpenAI default
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None  # the text ends before the first one found
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted, unused
    kv_transfer_params: KVTransferParams | None = None

    @property
    def num_choices(self) -> int:
        return 1 if self.n is None else self.n

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def check_common(self) -> None:
        """Value checks msgspec's types cannot express; raises ``RequestError`` (400)."""
        if not 1 <= self.num_choices <= MAX_N:
            raise RequestError(400, f"n: must be in [1, {MAX_N}], got {self.n}", param="n")
        kv = self.kv_transfer_params
        if self.num_choices > 1 and kv is not None and kv.do_remote_decode:
            raise RequestError(
                400, "n: must be 1 with kv_transfer_params.do_remote_decode", param="n"
            )
        if any(not s for s in self.stop_strings):
            raise RequestError(400, "stop: stop strings must not be empty", param="stop")
        if self.kv_transfer_params is not None:
            _check_block_ids(self.kv_transfer_params.remote_block_ids)
            _check_first_token(self.kv_transfer_params)


class CompletionRequest(GenerationRequest, kw_only=True):
    """Body of ``POST /v1/completions``; ``prompt`` is text or a list of token ids."""

    prompt: str | list[int]
    logprobs: int | None = None  # how many most likely tokens to report per position (0..20)

    def check(self) -> None:
        """Value checks msgspec's types cannot express; raises ``RequestError`` (400)."""
        self.check_common()
        if isinstance(self.prompt, str) and not self.prompt:
            raise RequestError(400, "prompt: must not be empty", param="prompt")
        if isinstance(self.prompt, list) and not self.prompt:
            raise RequestError(400, "prompt: the token id list must not be empty", param="prompt")


def _check_block_ids(block_ids: list[Any] | None) -> None:
    """``remote_block_ids`` is a list of ints, or one list of ints per KV cache group."""
    if block_ids is None:
        return
    groups = block_ids if block_ids and isinstance(block_ids[0], list) else [block_ids]
    for group in groups:
        if not isinstance(group, list) or not all(
            isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in group
        ):
            raise RequestError(
                400,
                "kv_transfer_params.remote_block_ids: expected a list of non-negative ints "
                "(or one such list per KV cache group)",
                param="kv_transfer_params.remote_block_ids",
            )


def _check_first_token(kv: KVTransferParams) -> None:
    """The connector's own checks of ``first_token`` (``kvbridge.nixl.params``), as a 400."""
    if kv.first_token is None:
        return
    from kvbridge.nixl.params import FirstToken, KVTransferParamsError, check_first_token

    param = "kv_transfer_params.first_token"
    if not kv.do_remote_prefill:
        raise RequestError(400, f"{param}: only with do_remote_prefill", param=param)
    token = kv.first_token
    top = tuple((int(t), float(lp)) for t, lp in token.top_logprobs or ())
    first = FirstToken(token_id=token.token_id, logprob=token.logprob, rank=token.rank,
                       top_logprobs=top, prompt_hash=token.prompt_hash)  # fmt: skip
    try:
        check_first_token(first)
    except KVTransferParamsError as e:
        message = str(e)
        raise RequestError(400, message, param=message.split(":", 1)[0]) from None


_decoder = msgspec.json.Decoder(CompletionRequest)


def decode_body(decoder: msgspec.json.Decoder[Any], body: bytes) -> Any:
    """Parse a body with ``decoder``; ``RequestError(400)`` names the offending field."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as e:
        raise RequestError(400, f"invalid request: {e}", param=_param(str(e))) from None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
        # invalid UTF-8 and too-deep nesting escape msgspec as plain Python errors
        raise RequestError(400, f"malformed JSON: {e}") from None


def decode_completion_request(body: bytes) -> CompletionRequest:
    """Parse and validate a ``/v1/completions`` body."""
    request: CompletionRequest = decode_body(_decoder, body)
    request.check()
    return request


def _param(message: str) -> str | None:
    """``Expected `int`, got `str` - at `$.n``` -> ``n``; unknown fields get their own name."""
    at = _AT.search(message)
    path = at.group("path") if at else ""
    unknown = _UNKNOWN.search(message)
    if unknown:
        path = f"{path}.{unknown.group('name')}" if path else unknown.group("name")
    return path or None


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI-style error object."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status)


def add_error_handlers(app: FastAPI) -> None:
    """The framework's errors (404, 405, uncaught exceptions) in the OpenAI error shape."""

    @app.exception_handler(HTTPException)
    async def http_error(request: HttpRequest, exc: HTTPException) -> Response:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        response = error_response(exc.status_code, message)
        response.headers.update(exc.headers or {})  # e.g. a 405's Allow
        return response

    @app.exception_handler(Exception)
    async def unexpected(_: HttpRequest, exc: Exception) -> Response:
        logger.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}")


async def read_body(request: HttpRequest, limit: int) -> bytes:
    """The request body; ``RequestError(413)`` if it is longer than ``limit`` bytes, 499 if
    the client left before sending all of it."""
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            elif size > limit * _DRAIN_FACTOR:
                break
    except ClientDisconnect:  # gone before its body arrived: nobody reads the answer
        raise RequestError(499, "client disconnected before sending its whole body") from None
    if size > limit:
        raise RequestError(413, f"request body is larger than the server limit of {limit} bytes")
    return b"".join(chunks)
