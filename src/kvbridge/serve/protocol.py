"""Wire types of ``/v1/completions`` (OpenAI format plus ``kv_transfer_params``), via msgspec.

Decoding is strict: unknown fields (top level or inside ``kv_transfer_params``) and wrong types
are errors whose message names the field, e.g. ``Object contains unknown field `foo` - at
`$.kv_transfer_params```. The server answers every such error with HTTP 400.
"""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse

# An oversize body is read (and dropped) up to this many times the limit before the 413 goes
# out, so the client sees the answer instead of a reset connection.
_DRAIN_FACTOR = 64


class RequestError(Exception):
    """A request the server refuses; ``status`` is the HTTP code, ``message`` says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


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

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = msgspec.to_builtins(self)
        return out


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    """OpenAI-style stream options of a completion request."""

    include_usage: bool = False


class CompletionRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``POST /v1/completions``; ``prompt`` is text or a list of token ids."""

    prompt: str | list[int]
    model: str | None = None
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    kv_transfer_params: KVTransferParams | None = None

    def check(self) -> None:
        """Value checks msgspec's types cannot express; raises ``RequestError`` (400)."""
        if self.n != 1:
            raise RequestError(400, f"n: only n=1 is supported, got {self.n}")
        if isinstance(self.prompt, str) and not self.prompt:
            raise RequestError(400, "prompt: must not be empty")
        if isinstance(self.prompt, list) and not self.prompt:
            raise RequestError(400, "prompt: the token id list must not be empty")
        if self.kv_transfer_params is not None:
            _check_block_ids(self.kv_transfer_params.remote_block_ids)


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
            )


_decoder = msgspec.json.Decoder(CompletionRequest)


def decode_completion_request(body: bytes) -> CompletionRequest:
    """Parse and validate a request body; ``RequestError(400)`` names the offending field."""
    try:
        request = _decoder.decode(body)
    except msgspec.ValidationError as e:
        raise RequestError(400, f"invalid request: {e}") from None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
        # invalid UTF-8 and too-deep nesting escape msgspec as plain Python errors
        raise RequestError(400, f"malformed JSON: {e}") from None
    request.check()
    return request


def error_body(status: int, message: str) -> dict[str, Any]:
    """OpenAI-style error object."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "code": status}}


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse(error_body(status, message), status_code=status)


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
