"""ModelRunner: the model, its paged KV cache, and one batched forward per engine step.

KV cache: per layer ``layers.{i}`` a tensor ``[num_blocks, 2, block_size, num_kv_heads,
head_dim]`` (``KVCacheLayout.BLOCKS_FIRST``: a block-layer, K and V, is one contiguous region).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Protocol

import torch

from kvbridge.connector.types import DTYPE_SIZES, KVCacheLayout, KVCacheSpec
from kvbridge.engine.attention import ChunkSpan, build_attention_metadata
from kvbridge.engine.loader import init_random, load_hf_checkpoint
from kvbridge.engine.model import LlamaForCausalLM, layer_name
from kvbridge.engine.model_config import ModelConfig

logger = logging.getLogger(__name__)

# Fields that may differ between a passed config and a checkpoint's without changing the math.
_COSMETIC_FIELDS = frozenset(
    {"name", "eos_token_id", "bos_token_id", "extra_eos_token_ids", "max_position_embeddings"}
)


@dataclass(frozen=True)
class SeqChunk:
    """Tokens of one request to compute in this step."""

    request_id: str
    token_ids: list[int]  # tokens to compute this step
    start_pos: int  # position of token_ids[0] (== tokens already in the KV cache)
    block_table: list[int]  # all of the request's block ids (covers start_pos + len(token_ids))
    sample: bool  # return logits for the last token of this chunk


class LayerHooks(Protocol):
    """Per-layer callbacks around the forward (the engine forwards them to its connector)."""

    def before_layer(self, layer_name: str) -> None: ...  # connector.wait_for_layer_load

    def after_layer(self, layer_name: str, kv_cache: torch.Tensor) -> None: ...  # save_kv_layer


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the string form ``KVCacheSpec`` uses)."""
    return str(dtype).removeprefix("torch.")


class ModelRunner:
    """Runs in the worker; owns the model weights and the KV cache tensors on ``device``."""

    def __init__(
        self,
        model_config: ModelConfig,
        *,
        num_blocks: int,
        block_size: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        checkpoint: str | None = None,
        seed: int = 0,
    ) -> None:
        for key, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{key}: must be a positive int, got {value!r}")
        if dtype_name(dtype) not in DTYPE_SIZES:
            raise ValueError(f"dtype: {dtype} is not supported (use one of {list(DTYPE_SIZES)})")
        self.device = torch.device(device)
        self.dtype = dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.model: LlamaForCausalLM
        if checkpoint is not None:
            self.model, ckpt_config = load_hf_checkpoint(checkpoint, dtype=dtype, device=device)
            _check_same_model(model_config, ckpt_config, checkpoint)
            self.model_config = ckpt_config
        else:
            self.model = init_random(model_config, seed=seed, dtype=dtype, device=device)
            self.model_config = model_config
        cfg = self.model_config
        shape = (num_blocks, 2, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches: dict[str, torch.Tensor] = {
            layer_name(i): torch.zeros(shape, dtype=dtype, device=self.device)
            for i in range(cfg.num_layers)
        }
        self._cache_list = list(self.kv_caches.values())
        self.cache_spec = KVCacheSpec(
            block_size=block_size,
            num_blocks=num_blocks,
            num_layers=cfg.num_layers,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            dtype=dtype_name(dtype),
            layout=KVCacheLayout.BLOCKS_FIRST,
            model_name=cfg.name,
        )
        logger.info(
            "model runner: %s on %s (%s), %d blocks x %d tokens, %.1f MiB KV cache",
            cfg.name or "model",
            self.device,
            dtype_name(dtype),
            num_blocks,
            block_size,
            self.cache_spec.block_bytes * num_blocks / 2**20,
        )

    @torch.inference_mode()
    def execute(
        self, chunks: Sequence[SeqChunk], layer_hooks: LayerHooks | None = None
    ) -> torch.Tensor:
        """One forward over all chunks' tokens; float32 logits ``[num sample chunks, vocab]``.

        Each chunk's new K/V is written to its blocks before attention. An empty ``chunks``
        runs nothing (no hooks) and returns ``[0, vocab]``.
        """
        vocab = self.model_config.vocab_size
        if not chunks:
            return torch.empty((0, vocab), dtype=torch.float32, device=self.device)
        spans: list[ChunkSpan] = []
        token_ids: list[int] = []
        sample_rows: list[int] = []
        for chunk in chunks:
            self._check_chunk(chunk)
            token_ids.extend(chunk.token_ids)
            spans.append(ChunkSpan(chunk.start_pos, len(chunk.token_ids), chunk.block_table))
            if chunk.sample:
                sample_rows.append(len(token_ids) - 1)
        groups = self.model_config.num_heads // self.model_config.num_kv_heads
        meta = build_attention_metadata(spans, self.block_size, self.device, groups)
        # Both index tensors reach the device before the forward is queued: a copy from
        # pageable host memory waits for the stream, so one made after it would hold the host
        # until the whole forward ran before the logits could be queued.
        input_ids = torch.tensor(token_ids, dtype=torch.long).to(self.device)
        rows = torch.tensor(sample_rows, dtype=torch.long).to(self.device) if sample_rows else None
        hidden = self.model(input_ids, meta, self._cache_list, layer_hooks)
        if rows is None:
            return torch.empty((0, vocab), dtype=torch.float32, device=self.device)
        return self.model.compute_logits(hidden.index_select(0, rows))

    def _check_chunk(self, chunk: SeqChunk) -> None:
        n = len(chunk.token_ids)
        if n == 0:
            raise ValueError(f"SeqChunk {chunk.request_id}: token_ids is empty")
        if chunk.start_pos < 0:
            raise ValueError(f"SeqChunk {chunk.request_id}: start_pos {chunk.start_pos} < 0")
        end = chunk.start_pos + n
        need = -(-end // self.block_size)
        if len(chunk.block_table) < need:
            raise ValueError(
                f"SeqChunk {chunk.request_id}: block_table has {len(chunk.block_table)} blocks, "
                f"{end} tokens need {need}"
            )
        bad = [b for b in chunk.block_table[:need] if not 0 <= b < self.num_blocks]
        if bad:
            raise ValueError(
                f"SeqChunk {chunk.request_id}: block ids {bad} outside [0, {self.num_blocks})"
            )
        vocab = self.model_config.vocab_size
        if min(chunk.token_ids) < 0 or max(chunk.token_ids) >= vocab:
            raise ValueError(f"SeqChunk {chunk.request_id}: token id outside [0, {vocab})")

    @staticmethod
    def estimate_num_blocks(
        model_config: ModelConfig,
        *,
        block_size: int,
        budget_bytes: int,
        dtype: torch.dtype = torch.float32,
    ) -> int:
        """How many KV blocks (all layers) fit in ``budget_bytes``."""
        per_token = 2 * model_config.num_kv_heads * model_config.head_dim * model_config.num_layers
        block_bytes = per_token * block_size * DTYPE_SIZES[dtype_name(dtype)]
        return max(0, budget_bytes // block_bytes)


def _check_same_model(given: ModelConfig, loaded: ModelConfig, checkpoint: str) -> None:
    diffs = [
        f"{f.name} (given {getattr(given, f.name)!r}, checkpoint {getattr(loaded, f.name)!r})"
        for f in fields(ModelConfig)
        if f.name not in _COSMETIC_FIELDS and getattr(given, f.name) != getattr(loaded, f.name)
    ]
    if diffs:
        raise ValueError(
            f"model_config: does not match checkpoint {checkpoint}: {'; '.join(diffs)}"
        )
