"""The ``kv_transfer_params`` protocol of SPEC §3: a typed schema and its validator.

A prefill request carries ``{"do_remote_decode": true}``; the prefill engine answers with the
remote-prefill form that the decode engine receives::

    {"do_remote_prefill": true, "remote_engine_id": ..., "remote_host": ..., "remote_port": ...,
     "remote_block_ids": [...], "remote_request_id": ..., "tp_size": ...}

``remote_block_ids`` is a list of ints (one KV cache group) or a list of such lists (one per
group of a hybrid cache); entry ``i`` holds the prompt's tokens ``[i*bs, (i+1)*bs)``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from kvbridge.connector.types import BlockIds


class KVTransferParamsError(ValueError):
    """``kv_transfer_params`` is malformed; the message names the field."""


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


class RemotePrefill(msgspec.Struct, frozen=True, kw_only=True):
    """A validated remote-prefill reference: where the prompt's KV blocks wait."""

    remote_engine_id: str
    remote_host: str
    remote_port: int
    remote_block_ids: tuple[list[int], ...]  # one list per KV cache group
    remote_request_id: str
    tp_size: int = 1


class TransferParams(msgspec.Struct, frozen=True, kw_only=True):
    """Parsed ``kv_transfer_params``: at most one of the two roles is set."""

    do_remote_decode: bool = False
    remote_prefill: RemotePrefill | None = None


_FIELD_RE = re.compile(r"at `\$\.(\w+)")
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
    )
    return TransferParams(remote_prefill=remote)


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
    *, engine_id: str, host: str, port: int, block_ids: BlockIds, request_id: str, tp_size: int
) -> dict[str, Any]:
    """The params a producer returns for a finished ``do_remote_decode`` request."""
    ids: list[Any] = list(block_ids[0]) if len(block_ids) == 1 else [list(g) for g in block_ids]
    return {
        "do_remote_decode": False,
        "do_remote_prefill": True,
        "remote_engine_id": engine_id,
        "remote_host": host,
        "remote_port": port,
        "remote_block_ids": ids,
        "remote_request_id": request_id,
        "tp_size": tp_size,
    }


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
    if unknown:
        return f"kv_transfer_params.{unknown.group(1)}: unknown field"
    field = _FIELD_RE.search(text)
    name = field.group(1) if field else "?"
    detail = text.split(" - at ")[0]
    return f"kv_transfer_params.{name}: {detail}"


def _kind(value: object) -> str:
    return type(value).__name__
