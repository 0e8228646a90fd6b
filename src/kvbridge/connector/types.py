"""Engine-facing types: what a connector sees of requests, blocks, steps and the KV cache.

These are kvbridge's own (no vLLM import). They are small on purpose: an engine adapter fills
them, a connector reads them. None of them needs torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple, Protocol, runtime_checkable

# One list of block ids per KV cache group (hybrid models have several groups).
BlockIds = tuple[list[int], ...]


class IntegrityError(AssertionError):
    """What every ``check_integrity`` raises: an invariant of a pool or table does not hold
    (a bug, not a runtime condition); the message names the owner and what broke."""


class KVCacheLayout(StrEnum):
    """Memory layout of one layer's KV tensor, declared by the engine at registration.

    ``BLOCKS_FIRST``: ``[num_blocks, 2, block_size, num_kv_heads, head_dim]`` — one block of one
    layer (K and V together) is a single contiguous region, so a block moves as one descriptor.
    ``KV_FIRST``: ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (vLLM's flash layout) —
    K and V of a block are two regions. The ``VLLM_*`` layouts are vLLM's (see below); every
    layout but ``KV_FIRST`` keeps a block-layer in one region (``kvbridge.connector.layout``).
    """

    BLOCKS_FIRST = "blocks_first"
    KV_FIRST = "kv_first"
    # vLLM's per-layer views, logical ``[num_blocks, num_kv_heads, block_size, 2 * head_dim]``
    # (K and V side by side), named after vLLM's physical orders: heads before tokens (LBHNC),
    # tokens before heads (LBNHC), and their cross-layer forms with blocks outermost.
    VLLM_LBHNC = "vllm_lbhnc"
    VLLM_LBNHC = "vllm_lbnhc"
    VLLM_BLHNC = "vllm_blhnc"
    VLLM_BLNHC = "vllm_blnhc"

    @property
    def is_block_dense(self) -> bool:
        """Whether one block of one layer is one dense region (all but ``KV_FIRST``)."""
        return self is not KVCacheLayout.KV_FIRST


@dataclass(frozen=True)
class KVCacheGroupSpec:
    """One KV cache group: the layers sharing a block table (e.g. full or sliding-window)."""

    name: str
    layer_names: tuple[str, ...]
    attention: str = "full"  # "full" | "sliding_window"
    sliding_window: int | None = None


@dataclass(frozen=True)
class KVCacheSpec:
    """The KV cache a connector serves: block geometry, model shape and groups.

    ``dtype`` is a string (``"float32"``, ``"bfloat16"``) so the scheduler half needs no torch.
    """

    block_size: int
    num_blocks: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    layout: KVCacheLayout = KVCacheLayout.BLOCKS_FIRST
    groups: tuple[KVCacheGroupSpec, ...] = ()
    model_name: str = ""
    world_size: int = 1

    def __post_init__(self) -> None:
        for name in ("block_size", "num_blocks", "num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVCacheSpec.{name}: must be a positive int, got {value!r}")
        if not self.groups:
            layers = tuple(f"layers.{i}" for i in range(self.num_layers))
            object.__setattr__(self, "groups", (KVCacheGroupSpec("full", layers),))

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def dtype_size(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def block_bytes_per_layer(self) -> int:
        """Bytes of one block of one layer, K and V together."""
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * self.dtype_size

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all layers."""
        return self.block_bytes_per_layer * self.num_layers


DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}


@runtime_checkable
class RequestView(Protocol):
    """What a connector may read of a request. The engine's own request type satisfies it."""

    @property
    def request_id(self) -> str: ...
    @property
    def prompt_token_ids(self) -> list[int]: ...
    @property
    def all_token_ids(self) -> list[int]: ...
    @property
    def num_prompt_tokens(self) -> int: ...
    @property
    def num_tokens(self) -> int: ...
    @property
    def num_computed_tokens(self) -> int: ...
    @property
    def block_hashes(self) -> list[bytes]: ...
    @property
    def kv_transfer_params(self) -> dict[str, Any] | None: ...
    @property
    def finish_reason(self) -> str | None:
        """How the request ended, once it has: "length" (max_tokens or max_model_len), "stop",
        "abort", "error" or "rejected"; None while it runs, or when the engine does not say."""
        ...


@dataclass
class SimpleRequest:
    """A plain ``RequestView`` for tests and adapters."""

    request_id: str
    prompt_token_ids: list[int]
    block_hashes: list[bytes] = field(default_factory=list)
    kv_transfer_params: dict[str, Any] | None = None
    num_computed_tokens: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)


@dataclass(frozen=True)
class ScheduledRequest:
    """One request in a scheduler step, as a connector sees it.

    ``num_computed_tokens`` counts tokens whose KV is *confirmed* in the GPU cache before this
    step runs (a store may copy those blocks); ``num_scheduled_tokens`` will be computed by this
    step. ``block_ids`` are all the request's blocks after this step's allocation.
    """

    request: RequestView
    block_ids: BlockIds
    num_computed_tokens: int
    num_scheduled_tokens: int
    resumed_from_preemption: bool = False

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass(frozen=True)
class SchedulerStep:
    """The scheduler's output for one engine step, as passed to ``build_connector_meta``."""

    step_id: int
    scheduled: tuple[ScheduledRequest, ...] = ()
    # Requests that ended since the previous step (their ids go to the worker's get_finished).
    finished_req_ids: frozenset[str] = frozenset()
    # Requests preempted this step (their blocks were freed; any in-flight work must be dropped).
    preempted_req_ids: frozenset[str] = frozenset()


class MatchResult(NamedTuple):
    """Answer of ``get_num_new_matched_tokens``: ``num_tokens is None`` means "ask again"."""

    num_tokens: int | None
    load_async: bool


class FinishedRequest(NamedTuple):
    """Answer of ``request_finished``: keep blocks until ``finished_sending``, params for client."""

    delay_free: bool
    kv_transfer_params: dict[str, Any] | None


class HandoverToken(NamedTuple):
    """The first token a remote prefill sampled, handed to the decode engine (SPEC §3): the
    engine appends it as the request's first output, so the connector can supply every prompt
    token and the first decode step computes this token instead of the last prompt token."""

    token_id: int
    logprob: float | None = None  # its log-probability under the producer's logits, if known
    rank: int | None = None  # 1 + how many tokens were more likely, if known
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@runtime_checkable
class SupportsHandover(Protocol):
    """A scheduler half that may hand an engine a request's first token (``HandoverToken``).

    The engine asks once, when the request arrives, before any other hook; a token it appends
    must then be counted in ``num_tokens`` and ``all_token_ids`` (and the connector may offer
    every prompt token). An engine that never asks keeps the plain path."""

    def get_handover_token(self, request: RequestView) -> HandoverToken | None: ...


class FinishedTransfers(NamedTuple):
    """Worker answer of ``get_finished``: request ids whose async send / receive completed."""

    sending: frozenset[str]
    recving: frozenset[str]


class Medium(StrEnum):
    """Where a KV event's blocks live."""

    CPU = "CPU"
    GPU = "GPU"
    REMOTE = "REMOTE"
    STORAGE = "STORAGE"  # a disk or file tier (vLLM's fs and object-store tiers use it too)


@dataclass(frozen=True)
class BlockStored:
    """KV event: blocks with these hashes are now held on ``medium``.

    ``group_idx``: the KV cache group on a hybrid cache (the same tokens are one block per
    group); None on a single-group cache, as vLLM's events leave it unspecified there.
    """

    block_hashes: tuple[bytes, ...]
    medium: Medium
    block_size: int
    group_idx: int | None = None


@dataclass(frozen=True)
class BlockRemoved:
    """KV event: blocks with these hashes are no longer held on ``medium`` (``group_idx`` as in
    ``BlockStored``)."""

    block_hashes: tuple[bytes, ...]
    medium: Medium
    group_idx: int | None = None


KVCacheEvent = BlockStored | BlockRemoved
