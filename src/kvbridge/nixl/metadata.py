"""What the NixlConnector's halves tell each other each step, and what its peers notify."""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from typing import Literal

import msgspec

from kvbridge.connector.base import KVConnectorMetadata, KVConnectorWorkerMetadata


class RecvSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Consumer: read ``remote_block_ids[g][i]`` of a remote engine into ``local_block_ids[g][i]``.

    Both are per KV cache group and already cut to the blocks to load. ``fail_reason`` set
    means the scheduler could not plan the load: the worker reports it failed at once.
    """

    request_id: str
    local_block_ids: tuple[list[int], ...]
    remote_engine_id: str
    remote_host: str
    remote_port: int
    remote_block_ids: tuple[list[int], ...]
    remote_request_id: str
    fail_reason: str | None = None
    prompt_hash: str = ""  # of the prompt whose KV this load needs ("" when unknown)
    # ``blocks_digest`` of every block the producer holds for the request ("": the load does
    # not use the producer's lease board, it waits for the lease answer)
    remote_blocks_digest: str = ""

    @property
    def all_local_block_ids(self) -> set[int]:
        return {b for group in self.local_block_ids for b in group}


class SendSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Producer: hold a finished request's blocks for a remote reader under a lease.

    ``block_ids`` (per KV cache group) are the held blocks, which host-staged mode copies to
    the host buffer before the lease starts.
    """

    request_id: str
    num_blocks: int
    lease_duration_s: float
    abort_timeout_s: float
    block_ids: tuple[list[int], ...] = ()
    prompt_hash: str = ""  # of the prompt whose KV the blocks hold ("" when unknown)


class RemoteRelease(msgspec.Struct, frozen=True, kw_only=True):
    """Consumer: tell a producer it may free a request's blocks (nothing will be read)."""

    remote_engine_id: str
    remote_host: str
    remote_port: int
    remote_request_id: str


class NixlConnectorMetadata(KVConnectorMetadata, kw_only=True):
    """Scheduler -> worker, one step."""

    reqs_to_recv: dict[str, RecvSpec] = msgspec.field(default_factory=dict)
    reqs_to_send: dict[str, SendSpec] = msgspec.field(default_factory=dict)
    # Consumer loads to cancel: request id -> report it in finished_recving once nothing writes
    # into its blocks (True: it ended mid-load; False: it was preempted, the engine freed them).
    reqs_aborted: dict[str, bool] = msgspec.field(default_factory=dict)
    reqs_to_release: list[RemoteRelease] = msgspec.field(default_factory=list)


class NixlWorkerMetadata(KVConnectorWorkerMetadata, kw_only=True):
    """Worker -> scheduler: where the side channel listens, and why loads failed."""

    side_channel_host: str | None = None
    side_channel_port: int | None = None
    load_failures: dict[str, str] = msgspec.field(default_factory=dict)


NotifKind = Literal["done", "heartbeat", "release"]


class NixlNotif(msgspec.Struct, frozen=True, array_like=True):
    """A consumer -> producer NIXL notification about some of the producer's request ids;
    a "done" names its ``reader`` (the load that read the blocks)."""

    kind: NotifKind
    request_ids: list[str]
    reader: str = ""


_NOTIF_ENCODER = msgspec.msgpack.Encoder()
_NOTIF_DECODER = msgspec.msgpack.Decoder(NixlNotif)
MAX_NOTIF_BYTES = 1 << 20


def encode_notif(kind: NotifKind, request_ids: list[str], reader: str = "") -> bytes:
    return _NOTIF_ENCODER.encode(NixlNotif(kind, request_ids, reader))


def prompt_hash(token_ids: Sequence[int] | None) -> str:
    """What binds a load to the prompt whose KV it reads ("" for no token ids)."""
    if not token_ids:
        return ""
    return hashlib.blake2b(array("q", token_ids).tobytes(), digest_size=16).hexdigest()


def blocks_digest(block_ids: Sequence[Sequence[int]]) -> str:
    """What names the blocks a producer holds for a request (every group's, in order)."""
    h = hashlib.blake2b(digest_size=8)
    for group in block_ids:
        h.update(array("q", group).tobytes())
        h.update(b"|")
    return h.hexdigest()


def reader_token(agent_name: str, request_id: str) -> str:
    """A consumer load's name for its "done" and its lease questions (fixed size)."""
    key = f"{agent_name}\0{request_id}".encode()
    return hashlib.blake2b(key, digest_size=8).hexdigest()


def decode_notif(payload: bytes) -> NixlNotif:
    """Raises ``ValueError`` for anything but a well-formed notification."""
    if len(payload) > MAX_NOTIF_BYTES:
        raise ValueError(f"notification of {len(payload)} bytes exceeds {MAX_NOTIF_BYTES}")
    try:
        return _NOTIF_DECODER.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError) as e:  # msgspec lets bad UTF-8 through
        raise ValueError(f"malformed notification: {e}") from None
