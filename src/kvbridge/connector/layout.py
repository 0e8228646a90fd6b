"""A layer's KV tensor seen as block rows: what the copy engines and NIXL move.

Connectors move whole blocks and never look inside one, so any layout in which one block of
one layer is a single dense run of memory (whatever the order of heads, tokens and K/V inside
it) is served the same way: as ``[num_blocks, block_elems]`` rows over the engine's own
memory. No byte is reinterpreted across blocks; the inner order stays the engine's, and the
layout name travels in NIXL's compatibility hash so two engines with different inner orders
never exchange blocks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvbridge.config import ConfigError
from kvbridge.connector.types import KVCacheLayout, KVCacheSpec

if TYPE_CHECKING:
    import torch


def layer_shape(spec: KVCacheSpec) -> tuple[int, ...]:
    """The logical shape of one layer's KV tensor under ``spec.layout``."""
    nb, bs, h, d = spec.num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim
    if spec.layout is KVCacheLayout.BLOCKS_FIRST:
        return (nb, 2, bs, h, d)
    if spec.layout is KVCacheLayout.KV_FIRST:
        return (2, nb, bs, h, d)
    # vLLM's per-layer view: logical [B, H, N, C] with K and V side by side in C.
    return (nb, h, bs, 2 * d)


def block_rows(spec: KVCacheSpec, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (layer ``name``) as ``[num_blocks, block_elems]`` rows of its own memory.

    Raises ``ConfigError`` naming the layer when the shape or dtype differs from ``spec`` or a
    block is not one dense run of memory (e.g. heads strided across blocks).
    """
    import torch

    want = layer_shape(spec)
    dtype = str(tensor.dtype).removeprefix("torch.")
    if tuple(tensor.shape) != want or dtype != spec.dtype:
        raise ConfigError(
            f"kv_caches[{name!r}]: {tuple(tensor.shape)} {dtype}, the cache spec declares "
            f"{want} {spec.dtype} ({spec.layout.value})"
        )
    if not spec.layout.is_block_dense:
        raise ConfigError(
            f"kv_caches[{name!r}]: layout {spec.layout.value!r} splits a block into several "
            "regions; kvbridge moves one dense region per block and layer"
        )
    block_elems = spec.block_bytes_per_layer // tensor.element_size()
    expected = 1
    dense = True
    for dim in reversed(_inner_order(spec.layout)):
        if tensor.shape[dim] != 1 and tensor.stride(dim) != expected:
            dense = False
        expected *= tensor.shape[dim]
    if dense and tensor.stride(0) >= block_elems:
        return torch.as_strided(
            tensor, (want[0], block_elems), (tensor.stride(0), 1), tensor.storage_offset()
        )
    raise ConfigError(
        f"kv_caches[{name!r}]: strides {tuple(tensor.stride())} do not keep each block of "
        f"{block_elems} elements in one dense run in the order {spec.layout.value} declares"
    )


def _inner_order(layout: KVCacheLayout) -> tuple[int, ...]:
    """Dims of a block (after the block dim), outermost first in memory."""
    if layout in (KVCacheLayout.VLLM_LBNHC, KVCacheLayout.VLLM_BLNHC):
        return (2, 1, 3)  # tokens before heads
    if layout is KVCacheLayout.BLOCKS_FIRST:
        return (1, 2, 3, 4)
    return (1, 2, 3)
