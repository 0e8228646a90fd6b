"""Paged attention over the BLOCKS_FIRST KV cache, with torch's scaled_dot_product_attention.

Per layer the cache is ``[num_blocks, 2, block_size, num_kv_heads, head_dim]`` (index 0 of dim 1
is K, 1 is V). Token ``pos`` of a sequence lives in block ``block_table[pos // block_size]`` at
offset ``pos % block_size``; its *slot* is ``block * block_size + offset``.

Prefill chunks run one SDPA call each (causal from their offset); single-token chunks (decode)
run together as one padded batch with a key-length mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F


class ChunkSpan(NamedTuple):
    """One sequence's share of a flattened batch: ``num_tokens`` new tokens from ``start_pos``."""

    start_pos: int
    num_tokens: int
    block_table: Sequence[int]


@dataclass(frozen=True)
class PrefillSeq:
    """A chunk with more than one query token (or the first of a prompt)."""

    q_start: int  # index of its first token in the flattened batch
    q_len: int
    start_pos: int
    block_ids: torch.Tensor  # [ceil(kv_len / block_size)] blocks holding keys 0..kv_len-1
    # [q_len, kv_len] bool (True = attend); None when start_pos == 0 (plain causal).
    mask: torch.Tensor | None

    @property
    def kv_len(self) -> int:
        return self.start_pos + self.q_len


@dataclass(frozen=True)
class DecodeBatch:
    """All single-token chunks of a step, attended as one padded batch."""

    token_index: torch.Tensor  # [B] their indices in the flattened batch
    block_ids: torch.Tensor  # [B, max_blocks], padded with block 0 (masked out)
    max_kv_len: int
    mask: torch.Tensor | None  # [B, 1, 1, max_kv_len] bool; None when all lengths are equal


@dataclass(frozen=True)
class AttentionMetadata:
    """Per-step inputs of every attention layer, built once per forward."""

    positions: torch.Tensor  # [T] position of each token
    slot_mapping: torch.Tensor  # [T] cache slot each new token's K/V is written to
    slot_blocks: torch.Tensor  # [T] slot_mapping // block_size
    slot_offsets: torch.Tensor  # [T] slot_mapping % block_size
    prefills: tuple[PrefillSeq, ...]
    decode: DecodeBatch | None


def build_attention_metadata(
    spans: Sequence[ChunkSpan], block_size: int, device: torch.device
) -> AttentionMetadata:
    """Positions, slots and per-sequence attention plans for a flattened batch of chunks."""
    positions: list[torch.Tensor] = []
    slots: list[torch.Tensor] = []
    prefills: list[PrefillSeq] = []
    dec_index: list[int] = []
    dec_lens: list[int] = []
    dec_tables: list[Sequence[int]] = []
    q_start = 0
    for span in spans:
        kv_len = span.start_pos + span.num_tokens
        nb = -(-kv_len // block_size)
        table = torch.as_tensor(list(span.block_table[:nb]), dtype=torch.long)
        pos = torch.arange(span.start_pos, kv_len, dtype=torch.long)
        positions.append(pos)
        slots.append(table[pos // block_size] * block_size + pos % block_size)
        if span.num_tokens == 1:
            dec_index.append(q_start)
            dec_lens.append(kv_len)
            dec_tables.append(span.block_table[:nb])
        else:
            mask = None
            if span.start_pos > 0:
                # query i (position start_pos + i) sees keys 0..start_pos + i
                keys = torch.arange(kv_len)
                mask = (keys[None, :] <= pos[:, None]).to(device)
            prefills.append(
                PrefillSeq(q_start, span.num_tokens, span.start_pos, table.to(device), mask)
            )
        q_start += span.num_tokens
    slot_mapping = torch.cat(slots).to(device)
    return AttentionMetadata(
        positions=torch.cat(positions).to(device),
        slot_mapping=slot_mapping,
        slot_blocks=slot_mapping // block_size,
        slot_offsets=slot_mapping % block_size,
        prefills=tuple(prefills),
        decode=_build_decode(dec_index, dec_lens, dec_tables, block_size, device),
    )


def _build_decode(
    index: list[int],
    lens: list[int],
    tables: list[Sequence[int]],
    block_size: int,
    device: torch.device,
) -> DecodeBatch | None:
    if not index:
        return None
    max_len = max(lens)
    max_blocks = -(-max_len // block_size)
    padded = [list(t) + [0] * (max_blocks - len(t)) for t in tables]
    mask = None
    if min(lens) != max_len:
        keys = torch.arange(max_len)
        mask = (keys[None, :] < torch.tensor(lens)[:, None])[:, None, None, :].to(device)
    return DecodeBatch(
        token_index=torch.tensor(index, dtype=torch.long, device=device),
        block_ids=torch.tensor(padded, dtype=torch.long, device=device),
        max_kv_len=max_len,
        mask=mask,
    )


def write_kv(
    kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
) -> None:
    """Store the new tokens' K and V ``[T, kv_heads, head_dim]`` at their slots."""
    kv_cache[meta.slot_blocks, :, meta.slot_offsets] = torch.stack((k, v), dim=1)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """Write K/V into the cache, then attend; q ``[T, heads, D]``, k/v ``[T, kv_heads, D]``."""
    write_kv(kv_cache, k, v, meta)
    out = torch.empty_like(q)
    num_kv_heads, head_dim = kv_cache.shape[3], kv_cache.shape[4]
    for seq in meta.prefills:
        span = slice(seq.q_start, seq.q_start + seq.q_len)
        if seq.start_pos == 0:
            # Every key is new in this chunk: use it directly instead of gathering it back.
            keys, values = k[span].transpose(0, 1), v[span].transpose(0, 1)
        else:
            kv = kv_cache.index_select(0, seq.block_ids).transpose(0, 1)
            kv = kv.reshape(2, -1, num_kv_heads, head_dim)[:, : seq.kv_len].transpose(1, 2)
            keys, values = kv[0], kv[1]
        o = F.scaled_dot_product_attention(
            q[span].transpose(0, 1).unsqueeze(0),
            keys.unsqueeze(0),
            values.unsqueeze(0),
            attn_mask=seq.mask,
            is_causal=seq.mask is None,
            enable_gqa=True,
        )
        out[span] = o[0].transpose(0, 1)
    dec = meta.decode
    if dec is not None:
        batch = dec.block_ids.shape[0]
        kv = kv_cache[dec.block_ids].transpose(1, 2)  # [B, 2, max_blocks, bs, kv_heads, D]
        kv = kv.reshape(batch, 2, -1, num_kv_heads, head_dim)[:, :, : dec.max_kv_len]
        o = F.scaled_dot_product_attention(
            q.index_select(0, dec.token_index).unsqueeze(2),  # [B, heads, 1, D]
            kv[:, 0].transpose(1, 2),
            kv[:, 1].transpose(1, 2),
            attn_mask=dec.mask,
            enable_gqa=True,
        )
        out.index_copy_(0, dec.token_index, o.squeeze(2))
    return out
