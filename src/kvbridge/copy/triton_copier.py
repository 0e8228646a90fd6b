"""TritonCopier: one Triton kernel per batch moves whole blocks between the GPU cache and the
pinned CPU pool, reading or writing host memory straight from the GPU (zero-copy).

A pinned tensor's address is valid on the device under unified virtual addressing (every
64-bit CUDA process): ``cudaHostAlloc`` memory is mapped into the device's address space at
the same address, and Triton's launcher resolves it with ``cuPointerGetAttribute``. Triton is
imported only when this module is, which the CUDA backend does only for the ``direct``
strategy; without Triton the copier refuses to build.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import NamedTuple

import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None
VEC_BYTES = 16  # one vectorized access per thread and step
MAX_TILE = 2048  # int64 elements (16 KiB) per program

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["num_pairs"])
    def _copy_blocks_kernel(
        src,
        dst,
        src_ids,
        dst_ids,
        src_layer_vecs,
        dst_layer_vecs,
        num_pairs,
        ROW: tl.constexpr,
        TILE: tl.constexpr,
        TILES: tl.constexpr,
        EVEN: tl.constexpr,
    ):
        # program -> (layer, pair, tile); layer-major so neighbours write neighbouring rows
        pid = tl.program_id(0)
        tile = pid % TILES
        item = pid // TILES
        pair = item % num_pairs
        layer = item // num_pairs
        # layer starts are in 16-byte units: "* 2" lets Triton prove 16-byte alignment
        src_start = tl.load(src_layer_vecs + layer) * 2 + tl.load(src_ids + pair) * ROW
        dst_start = tl.load(dst_layer_vecs + layer) * 2 + tl.load(dst_ids + pair) * ROW
        offs = tile * TILE + tl.arange(0, TILE)
        if EVEN:
            tl.store(dst + dst_start + offs, tl.load(src + src_start + offs))
        else:
            mask = offs < ROW
            vals = tl.load(src + src_start + offs, mask=mask)
            tl.store(dst + dst_start + offs, vals, mask=mask)


class TileShape(NamedTuple):
    """How one block row of ``row`` int64 elements splits into kernel programs."""

    tile: int  # elements per program, a power of two
    tiles: int  # programs per row
    even: bool  # tile divides row: no masking


def tile_shape(row: int) -> TileShape:
    """Tiles of at most ``MAX_TILE`` elements covering a row of ``row`` int64 elements."""
    if row < 1:
        raise ValueError(f"tile_shape: row must be >= 1, got {row}")
    tile = min(MAX_TILE, 1 << (row - 1).bit_length())
    return TileShape(tile, -(-row // tile), row % tile == 0)


def vec_offsets(layers: Sequence[torch.Tensor], what: str) -> list[int]:
    """Each layer's start relative to the first layer's, in 16-byte units."""
    base = layers[0].data_ptr()
    offsets = []
    for i, layer in enumerate(layers):
        if layer.data_ptr() % VEC_BYTES or not layer.is_contiguous():
            raise ValueError(
                f"TritonCopier: {what} layer {i} must be contiguous and start on a "
                f"{VEC_BYTES}-byte boundary"
            )
        offsets.append((layer.data_ptr() - base) // VEC_BYTES)
    return offsets


class TritonCopier:
    """Runs in a worker; owns the layer address table of one cache/pool pair and launches the
    zero-copy block kernel on the caller's current stream.

    Each program copies one tile of one block row with 16-byte accesses; a batch is one launch
    of ``layers * pairs * tiles`` programs, whatever the runs of block ids.
    """

    def __init__(self, gpu_layers: Sequence[torch.Tensor], cpu_layers: Sequence[torch.Tensor]):
        if not HAVE_TRITON:
            raise ValueError("TritonCopier: the direct copy needs triton, which is not installed")
        first = gpu_layers[0]
        row_bytes = first[0].numel() * first.element_size()
        if row_bytes % VEC_BYTES:
            raise ValueError(
                f"TritonCopier: a block of one layer is {row_bytes} bytes, not a multiple of "
                f"{VEC_BYTES}"
            )
        table = [vec_offsets(gpu_layers, "cache"), vec_offsets(cpu_layers, "CPU pool")]
        self.device = first.device
        self.num_layers = len(gpu_layers)
        self.row = row_bytes // 8
        self.shape = tile_shape(self.row)
        self._gpu = _flat_int64(first)
        self._cpu = _flat_int64(cpu_layers[0])
        self._table = torch.tensor(table, dtype=torch.int64, device=self.device)

    def store(self, gpu_ids: torch.Tensor, cpu_ids: torch.Tensor) -> None:
        """Queue cache rows ``gpu_ids[i]`` -> CPU rows ``cpu_ids[i]`` (device int64 tensors)."""
        self._launch(self._gpu, self._cpu, gpu_ids, cpu_ids, self._table[0], self._table[1])

    def load(self, cpu_ids: torch.Tensor, gpu_ids: torch.Tensor) -> None:
        """Queue CPU rows ``cpu_ids[i]`` -> cache rows ``gpu_ids[i]`` (device int64 tensors)."""
        self._launch(self._cpu, self._gpu, cpu_ids, gpu_ids, self._table[1], self._table[0])

    def _launch(
        self,
        src: torch.Tensor,
        dst: torch.Tensor,
        src_ids: torch.Tensor,
        dst_ids: torch.Tensor,
        src_vecs: torch.Tensor,
        dst_vecs: torch.Tensor,
    ) -> None:
        pairs = src_ids.numel()
        if pairs == 0:
            return
        shape = self.shape
        grid = (self.num_layers * pairs * shape.tiles,)
        with torch.cuda.device(self.device):
            _copy_blocks_kernel[grid](
                src,
                dst,
                src_ids,
                dst_ids,
                src_vecs,
                dst_vecs,
                pairs,
                ROW=self.row,
                TILE=shape.tile,
                TILES=shape.tiles,
                EVEN=shape.even,
                num_warps=4,
            )


def _flat_int64(layer: torch.Tensor) -> torch.Tensor:
    return layer.reshape(-1).view(torch.uint8).view(torch.int64)
