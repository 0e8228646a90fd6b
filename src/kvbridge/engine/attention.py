"""Paged attention over the BLOCKS_FIRST KV cache, with torch's scaled_dot_product_attention.

Per layer the cache is ``[num_blocks, 2, block_size, num_kv_heads, head_dim]`` (index 0 of dim 1
is K, 1 is V). Token ``pos`` of a sequence lives in block ``block_table[pos // block_size]`` at
offset ``pos % block_size``; its *slot* is ``block * block_size + offset``.

Prefill chunks run one SDPA call each (causal from their offset); single-token chunks (decode)
run together as one padded batch with a key-length mask. Grouped-query attention over gathered
keys is *folded*: the G query heads sharing a KV head become G x q_len query rows of that head,
so SDPA sees plain multi-head attention and picks a fused kernel even with a mask.

A few query rows over a long context (the chunk after a prefix hit, decode at small batch) go
through ``matmul_attention`` on CUDA instead: the fused kernels split work over query tiles
and heads only, so 64 folded rows x 8 KV heads over 32k keys ran on 8 SMs, 1.6 ms a layer on
an H200 (50 of the 78 ms a 32k prefix hit took); two float32 matmuls spread over the keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

# cuDNN attention is left out: it builds a new graph for every new key length (about 30 ms on an
# H100), i.e. on every decode step. Flash handles causal prefill, efficient/math the masked rest.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# matmul_attention when SDPA would run fewer than this many (head, 64-row tile) programs ...
FEW_PROGRAMS = 64
# ... over at least this many keys, with float32 temporaries of at most this many bytes.
LONG_CONTEXT = 1024
MAX_SCORE_BYTES = 1 << 30
KEY_CHUNK = 1024  # keys per GEMM of matmul_attention's probs @ v


class ChunkSpan(NamedTuple):
    """One sequence's share of a flattened batch: ``num_tokens`` new tokens from ``start_pos``."""

    start_pos: int
    num_tokens: int
    block_table: Sequence[int]


@dataclass(frozen=True)
class PrefillSeq:
    """A chunk with more than one query token."""

    q_start: int  # index of its first token in the flattened batch
    q_len: int
    start_pos: int
    block_ids: torch.Tensor  # [ceil(kv_len / block_size)] blocks holding keys 0..kv_len-1
    # [groups * q_len, kv_len] bool (True = attend), rows g * q_len + i for query i (see
    # _folded_prefill); None when start_pos == 0 (plain causal).
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
    covers_batch: bool  # the step is decode only: token_index == arange(T)


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
    spans: Sequence[ChunkSpan], block_size: int, device: torch.device, gqa_groups: int = 1
) -> AttentionMetadata:
    """Positions, slots and per-sequence attention plans for a flattened batch of chunks.

    ``gqa_groups`` is ``num_heads // num_kv_heads`` (masks are laid out for folded queries).
    """
    # Host side: plain ints for single-token (decode) spans, one small tensor op set per prefill
    # span; everything reaches the device as one packed copy (and one more for decode tables).
    positions: list[int] = []
    slots: list[int] = []
    prefills: list[PrefillSeq] = []
    dec_index: list[int] = []
    dec_lens: list[int] = []
    dec_tables: list[Sequence[int]] = []
    q_start = 0
    for span in spans:
        kv_len = span.start_pos + span.num_tokens
        nb = -(-kv_len // block_size)
        if span.num_tokens == 1:
            pos = span.start_pos
            positions.append(pos)
            slots.append(span.block_table[pos // block_size] * block_size + pos % block_size)
            dec_index.append(q_start)
            dec_lens.append(kv_len)
            dec_tables.append(span.block_table[:nb])
        else:
            table = torch.as_tensor(list(span.block_table[:nb]), dtype=torch.long)
            pos_t = torch.arange(span.start_pos, kv_len, dtype=torch.long)
            positions.extend(range(span.start_pos, kv_len))
            slots.extend((table[pos_t // block_size] * block_size + pos_t % block_size).tolist())
            mask = None
            if span.start_pos > 0:
                # query i (position start_pos + i) sees keys 0..start_pos + i; built on the
                # device (a 16-token chunk over 32k keys is a 2 MiB mask)
                keys = torch.arange(kv_len, device=device)
                mask = keys[None, :] <= keys[span.start_pos :, None]
                mask = mask.repeat(gqa_groups, 1)
            prefills.append(
                PrefillSeq(q_start, span.num_tokens, span.start_pos, table.to(device), mask)
            )
        q_start += span.num_tokens
    packed = torch.tensor(
        [
            positions,
            slots,
            [s // block_size for s in slots],
            [s % block_size for s in slots],
        ],
        dtype=torch.long,
    ).to(device)  # one host-to-device copy
    decode = None
    if dec_index:
        covers = len(dec_index) == q_start
        decode = _build_decode(dec_index, dec_lens, dec_tables, block_size, device, covers)
    return AttentionMetadata(
        positions=packed[0],
        slot_mapping=packed[1],
        slot_blocks=packed[2],
        slot_offsets=packed[3],
        prefills=tuple(prefills),
        decode=decode,
    )


def _build_decode(
    index: list[int],
    lens: list[int],
    tables: list[Sequence[int]],
    block_size: int,
    device: torch.device,
    covers_batch: bool,
) -> DecodeBatch:
    max_len = max(lens)
    max_blocks = -(-max_len // block_size)
    rows = [[i, *t, *[0] * (max_blocks - len(t))] for i, t in zip(index, tables)]
    packed = torch.tensor(rows, dtype=torch.long).to(device)
    mask = None
    if min(lens) != max_len:
        keys = torch.arange(max_len)
        mask = (keys[None, :] < torch.tensor(lens)[:, None])[:, None, None, :].to(device)
    return DecodeBatch(packed[:, 0], packed[:, 1:], max_len, mask, covers_batch)


def write_kv(kv_cache: torch.Tensor, new_kv: torch.Tensor, meta: AttentionMetadata) -> None:
    """Store the new tokens' K and V ``[T, 2, kv_heads, head_dim]`` at their slots."""
    kv_cache[meta.slot_blocks, :, meta.slot_offsets] = new_kv


def paged_attention(
    q: torch.Tensor, new_kv: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
) -> torch.Tensor:
    """Write K/V into the cache, then attend; q ``[T, heads, D]``, new_kv ``[T, 2, kv_heads, D]``.

    Returns ``[T, heads, D]``.
    """
    write_kv(kv_cache, new_kv, meta)
    dec = meta.decode
    if dec is not None and dec.covers_batch:
        return _decode(q, kv_cache, dec)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    for seq in meta.prefills:
        span = slice(seq.q_start, seq.q_start + seq.q_len)
        if seq.mask is None:
            # Every key is new in this chunk: use it directly instead of gathering it back.
            kv = new_kv[span].permute(1, 2, 0, 3)  # [2, kv_heads, q_len, D]
            o = F.scaled_dot_product_attention(
                q[span].transpose(0, 1)[None],
                kv[0][None],
                kv[1][None],
                is_causal=True,
                enable_gqa=True,
            )
            out[span] = o[0].transpose(0, 1)
        else:
            out[span] = _folded_prefill(q[span], kv_cache, seq)
    if dec is not None:
        o = _decode(q.index_select(0, dec.token_index), kv_cache, dec)
        out.index_copy_(0, dec.token_index, o)
    return out


def _gather(
    kv_cache: torch.Tensor, block_ids: torch.Tensor, kv_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of ``block_ids`` (``[..., nb]``) as ``[..., kv_heads, kv_len, D]``."""
    shape = (*block_ids.shape[:-1], -1, kv_cache.shape[3], kv_cache.shape[4])
    k = kv_cache[:, 0][block_ids].view(shape)[..., :kv_len, :, :].transpose(-3, -2)
    v = kv_cache[:, 1][block_ids].view(shape)[..., :kv_len, :, :].transpose(-3, -2)
    return k, v


def _folded_prefill(q: torch.Tensor, kv_cache: torch.Tensor, seq: PrefillSeq) -> torch.Tensor:
    q_len, heads, dim = q.shape
    kv_heads = kv_cache.shape[3]
    groups = heads // kv_heads
    keys, values = _gather(kv_cache, seq.block_ids, seq.kv_len)  # [kv_heads, L, D]
    folded = q.view(q_len, kv_heads, groups, dim).permute(1, 2, 0, 3).reshape(1, kv_heads, -1, dim)
    o = _attend(folded, keys[None], values[None], seq.mask)
    return o.view(kv_heads, groups, q_len, dim).permute(2, 0, 1, 3).reshape(q_len, heads, dim)


def _decode(q: torch.Tensor, kv_cache: torch.Tensor, dec: DecodeBatch) -> torch.Tensor:
    batch, heads, dim = q.shape
    kv_heads = kv_cache.shape[3]
    keys, values = _gather(kv_cache, dec.block_ids, dec.max_kv_len)  # [B, kv_heads, L, D]
    folded = q.view(batch, kv_heads, heads // kv_heads, dim)
    return _attend(folded, keys, values, dec.mask).reshape(batch, heads, dim)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """SDPA, or ``matmul_attention`` where SDPA would leave most of a GPU idle."""
    rows, dim = q.shape[-2], q.shape[-1]
    heads = q.numel() // (rows * dim)  # batch x heads
    if use_matmul_attention(q.device.type, heads, rows, k.shape[-2], dim):
        return matmul_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def use_matmul_attention(
    device_type: str, heads: int, rows: int, keys: int, head_dim: int = 128
) -> bool:
    """Whether ``rows`` query rows per head (``heads``: batch x heads) over ``keys`` keys are a
    few rows over a long context on CUDA (see the module docstring), and the float32 copies
    it makes (K and V, scores and probabilities over the keys padded to ``KEY_CHUNK``, and
    one partial output per chunk) fit ``MAX_SCORE_BYTES``."""
    programs = heads * -(-rows // 64)
    chunks = -(-keys // KEY_CHUNK)
    padded = chunks * KEY_CHUNK
    score_bytes = 2 * heads * rows * padded * 4 + 2 * heads * padded * head_dim * 4
    score_bytes += heads * chunks * rows * head_dim * 4
    return (
        device_type == "cuda"
        and programs < FEW_PROGRAMS
        and keys >= LONG_CONTEXT
        and score_bytes <= MAX_SCORE_BYTES
    )


def matmul_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Attention with float32 scores and probabilities: ``q [..., M, D]``, ``k``/``v``
    ``[..., L, D]``, ``mask`` (True = attend) broadcastable to ``[..., M, L]``.

    The keys are split into chunks of ``KEY_CHUNK`` for ``probs @ v``: its output is only
    ``M x D`` per head, so one GEMM over all L keys ran on a few dozen SMs (1.3 ms a layer at
    32k on an H200); a GEMM per chunk, summed, spreads the reduction over the keys.
    """
    length = k.shape[-2]
    chunks = -(-length // KEY_CHUNK)
    padded = chunks * KEY_CHUNK
    if padded != length:  # zero keys and values after the last one, padded before widening
        pad = (0, 0, 0, padded - length)
        k, v = F.pad(k, pad), F.pad(v, pad)
    kf, vf = k.float(), v.float()
    scores = torch.matmul(q.float() * q.shape[-1] ** -0.5, kf.transpose(-1, -2))
    if mask is not None:
        scores[..., :length].masked_fill_(~mask, float("-inf"))
    if padded != length:
        scores[..., length:] = float("-inf")
    probs = torch.softmax(scores, dim=-1)
    rows = q.shape[-2]
    per_chunk = probs.unflatten(-1, (chunks, KEY_CHUNK)).transpose(-3, -2)  # [..., C, M, K]
    out = torch.matmul(per_chunk, vf.unflatten(-2, (chunks, KEY_CHUNK)))  # [..., C, M, D]
    return out.sum(dim=-3).view(*q.shape[:-2], rows, v.shape[-1]).to(q.dtype)
