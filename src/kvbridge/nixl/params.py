"""The ``kv_transfer_params`` protocol of SPEC §3: a typed schema and its validator.

A prefill request carries ``{"do_remote_decode": true}``; the prefill engine answers with the
remote-prefill form that the decode engine receives::

    {"do_remote_prefill": true, "remote_engine_id": ..., "remote_host": ..., "remote_port": ...,
     "remote_block_ids": [...], "remote_request_id": ..., "tp_size": ...,
     "first_token": {"token_id": ..., "logprob": ..., "rank": ..., "top_logprobs": [[id, lp]],
                     "prompt_hash": ...}}

``first_token`` (optional) is the token the producer sampled after the prompt, with what it
knows of its log-probability: a decode engine that takes it (``HandoverToken``) loads the KV of
every prompt token and computes this token first, instead of the prompt's last one. Its
``prompt_hash`` names the prompt it follows: a decode request for another prompt carrying these
params does not take it (its load fails closed too, on the lease answer's prompt hash).

``remote_block_ids`` is a list of ints (one KV cache group) or a list of such lists (one per
group of a hybrid cache); entry ``i`` holds the prompt's tokens ``[i*bs, (i+1)*bs)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from kvbridge.connector.types import BlockIds, HandoverToken


class KVTransferParamsError(ValueError):
    """``kv_transfer_params`` is malformed; the message names the field."""


class FirstToken(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``kv_transfer_params.first_token``: the producer's first sampled token."""

    token_id: int
    logprob: float | None = None
    rank: int | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    prompt_hash: str | None = None  # ``metadata.prompt_hash`` of the prompt it follows

    def handover(self) -> HandoverToken:
        return HandoverToken(self.token_id, self.logprob, self.rank, self.top_logprobs)


class _WireParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    do_remote_decode: bool = False
    do_remote_prefill: bool = False
    remote_engine_id: str | None = None
    remote_host: str | None = None
    remote_port: int | None = None
    remote_block_ids: list[Any] | None = None
    remote_request_id: str | None = None
    tp_size: int = 1
    # vLLM's producer adds its own prefix-cache hit count (for its metrics); read by nobody here.
    remote_prefill_cached_tokens: int | None = None
    first_token: FirstToken | None = None


class RemotePrefill(msgspec.Struct, frozen=True, kw_only=True):
    """A validated remote-prefill reference: where the prompt's KV blocks wait."""

    remote_engine_id: str
    remote_host: str
    remote_port: int
    remote_block_ids: tuple[list[int], ...]  # one list per KV cache group
    remote_request_id: str
    tp_size: int = 1
    first_token: FirstToken | None = None


class TransferParams(msgspec.Struct, frozen=True, kw_only=True):
    """Parsed ``kv_transfer_params``: at most one of the two roles is set."""

    do_remote_decode: bool = False
    remote_prefill: RemotePrefill | None = None


_FIELD_RE = re.compile(r"at `\$\.([\w.\[\]]+)`")
_UNKNOWN_RE = re.compile(r"unknown field `(\w+)`")
_REQUIRED = ("remote_engine_id", "remote_host", "remote_port", "remote_block_ids")


def parse_kv_transfer_params(raw: Mapping[str, Any] | None) -> TransferParams | None:
    """Validate a request's ``kv_transfer_params``; ``None`` when there are none.

    Raises ``KVTransferParamsError`` naming the first missing, ill-typed or unknown field.
    """
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise KVTransferParamsError(f"kv_transfer_params: expected an object, got {_kind(raw)}")
    try:
        wire = msgspec.convert(dict(raw), _WireParams, strict=True)
    except msgspec.ValidationError as e:
        raise KVTransferParamsError(_describe(e)) from None
    if wire.do_remote_decode and wire.do_remote_prefill:
        raise KVTransferParamsError(
            "kv_transfer_params.do_remote_prefill: cannot be combined with do_remote_decode"
        )
    if wire.first_token is not None:
        if not wire.do_remote_prefill:
            raise KVTransferParamsError(
                "kv_transfer_params.first_token: only with do_remote_prefill"
            )
        check_first_token(wire.first_token)
    if not wire.do_remote_prefill:
        return TransferParams(do_remote_decode=wire.do_remote_decode)
    engine_id, host, port = wire.remote_engine_id, wire.remote_host, wire.remote_port
    block_ids = wire.remote_block_ids
    missing = [n for n, v in zip(_REQUIRED, (engine_id, host, port, block_ids)) if v is None]
    if missing:
        raise KVTransferParamsError(
            f"kv_transfer_params.{missing[0]}: required when do_remote_prefill is true"
        )
    if engine_id is None or host is None or port is None or block_ids is None:
        raise AssertionError("unreachable")
    if not engine_id or not host:
        empty = "remote_engine_id" if not engine_id else "remote_host"
        raise KVTransferParamsError(f"kv_transfer_params.{empty}: must not be empty")
    if not 1 <= port <= 65535:
        raise KVTransferParamsError(
            f"kv_transfer_params.remote_port: {port} is not a TCP port (1..65535)"
        )
    if wire.tp_size < 1:
        raise KVTransferParamsError(f"kv_transfer_params.tp_size: must be >= 1, got {wire.tp_size}")
    remote = RemotePrefill(
        remote_engine_id=engine_id,
        remote_host=host,
        remote_port=port,
        remote_block_ids=_block_ids(block_ids),
        # vLLM's producer always sends it; default to the decode request's own id otherwise.
        remote_request_id=wire.remote_request_id or "",
        tp_size=wire.tp_size,
        first_token=wire.first_token,
    )
    return TransferParams(remote_prefill=remote)


def check_first_token(token: FirstToken) -> None:
    """Value checks of ``first_token`` that its types cannot express."""
    where = "kv_transfer_params.first_token"
    if token.token_id < 0:
        raise KVTransferParamsError(f"{where}.token_id: must be >= 0, got {token.token_id}")
    if token.logprob is not None and not _is_logprob(token.logprob):
        raise KVTransferParamsError(
            f"{where}.logprob: must be a finite number <= 0, got {token.logprob!r}"
        )
    if token.rank is not None and token.rank < 1:
        raise KVTransferParamsError(f"{where}.rank: must be >= 1, got {token.rank}")
    for i, (tid, lp) in enumerate(token.top_logprobs):
        if tid < 0 or not _is_logprob(lp):
            raise KVTransferParamsError(
                f"{where}.top_logprobs[{i}]: expected [token id >= 0, logprob <= 0], "
                f"got {[tid, lp]!r}"
            )


def _is_logprob(value: float) -> bool:
    return math.isfinite(value) and value <= 1e-6  # float32 log_softmax can round up to ~1e-7


def check_block_count(
    remote: RemotePrefill, num_prompt_tokens: int, block_size: int, num_groups: int
) -> None:
    """The remote side must hold exactly one block per ``block_size`` prompt tokens per group."""
    if len(remote.remote_block_ids) != num_groups:
        raise KVTransferParamsError(
            f"kv_transfer_params.remote_block_ids: {len(remote.remote_block_ids)} KV cache "
            f"group(s), this engine has {num_groups}"
        )
    want = -(-num_prompt_tokens // block_size)
    for group, ids in enumerate(remote.remote_block_ids):
        if len(ids) != want:
            where = "" if num_groups == 1 else f" (group {group})"
            raise KVTransferParamsError(
                f"kv_transfer_params.remote_block_ids{where}: {len(ids)} blocks, but the prompt "
                f"of {num_prompt_tokens} tokens fills {want} blocks of {block_size}"
            )


# vLLM's null block: what a sliding-window group's table holds where a block left the window.
NULL_BLOCK_ID = 0


def check_distinct_blocks(remote: RemotePrefill, sliding: Sequence[bool]) -> None:
    """No remote block id twice in a group: one block cannot hold two parts of a prompt (only
    the null block repeats, in a sliding-window group: ``sliding[g]``)."""
    for group, ids in enumerate(remote.remote_block_ids):
        seen: set[int] = set()
        for block in ids:
            if block in seen and not (sliding[group] and block == NULL_BLOCK_ID):
                where = "" if len(sliding) == 1 else f" (group {group})"
                raise KVTransferParamsError(
                    f"kv_transfer_params.remote_block_ids{where}: block {block} appears twice"
                )
            seen.add(block)


def remote_prefill_params(
    *,
    engine_id: str,
    host: str,
    port: int,
    block_ids: BlockIds,
    request_id: str,
    tp_size: int,
    first_token: HandoverToken | None = None,
    prompt_hash: str | None = None,
) -> dict[str, Any]:
    """The params a producer returns for a finished ``do_remote_decode`` request."""
    ids: list[Any] = list(block_ids[0]) if len(block_ids) == 1 else [list(g) for g in block_ids]
    out: dict[str, Any] = {
        "do_remote_decode": False,
        "do_remote_prefill": True,
        "remote_engine_id": engine_id,
        "remote_host": host,
        "remote_port": port,
        "remote_block_ids": ids,
        "remote_request_id": request_id,
        "tp_size": tp_size,
    }
    if first_token is not None:
        token: dict[str, Any] = {"token_id": first_token.token_id}
        if first_token.logprob is not None:
            token["logprob"] = first_token.logprob
        if first_token.rank is not None:
            token["rank"] = first_token.rank
        if first_token.top_logprobs:
            token["top_logprobs"] = [list(t) for t in first_token.top_logprobs]
        if prompt_hash:
            token["prompt_hash"] = prompt_hash
        out["first_token"] = token
    return out


def _block_ids(value: list[Any]) -> tuple[list[int], ...]:
    if not value:
        raise KVTransferParamsError("kv_transfer_params.remote_block_ids: must not be empty")
    groups = value if all(isinstance(v, list) for v in value) else [value]
    for group in groups:
        for block in group:
            if not isinstance(block, int) or isinstance(block, bool) or block < 0:
                raise KVTransferParamsError(
                    "kv_transfer_params.remote_block_ids: expected non-negative ints or one "
                    f"list of them per cache group, got {block!r}"
                )
    return tuple(list(g) for g in groups)


def _describe(error: msgspec.ValidationError) -> str:
    text = str(error)
    unknown = _UNKNOWN_RE.search(text)
    field = _FIELD_RE.search(text)
    if unknown:
        parent = f"{field.group(1)}." if field else ""
        return f"kv_transfer_params.{parent}{unknown.group(1)}: unknown field"
    name = field.group(1) if field else "?"
    detail = text.split(" - at ")[0]
    return f"kv_transfer_params.{name}: {detail}"


def _kind(value: object) -> str:
    return type(value).__name__
