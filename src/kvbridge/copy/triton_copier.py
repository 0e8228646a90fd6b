"""TritonCopier: one Triton kernel per batch moves whole blocks between the GPU cache and the
pinned CPU pool, reading or writing host memory straight from the GPU (zero-copy).

A pinned tensor's address is valid on the device under unified virtual addressing (every
64-bit CUDA process): ``cudaHostAlloc`` memory is mapped into the device's address space at
the same address, and Triton's launcher resolves it with ``cuPointerGetAttribute``. The same
kernel gathers cache blocks into (and scatters them from) a block-major GPU staging buffer for
the staged strategies (``TritonGather``). Triton is imported only when this module is, which
the CUDA backend does only when Triton is installed; without it the copier refuses to build.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from contextlib import nullcontext
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
        SRC_STRIDE: tl.constexpr,
        DST_STRIDE: tl.constexpr,
        LAYERS: tl.constexpr,
        PAIR_MAJOR: tl.constexpr,
        TILE: tl.constexpr,
        TILES: tl.constexpr,
        EVEN: tl.constexpr,
    ):
        # program -> (layer, pair, tile); the order that makes neighbours write neighbouring
        # rows: pair-major when the destination keeps a block's layers together
        pid = tl.program_id(0)
        tile = pid % TILES
        item = pid // TILES
        if PAIR_MAJOR:
            layer = item % LAYERS
            pair = item // LAYERS
        else:
            pair = item % num_pairs
            layer = item // num_pairs
        # layer starts are in 16-byte units: "* 2" lets Triton prove 16-byte alignment
        src_start = tl.load(src_layer_vecs + layer) * 2 + tl.load(src_ids + pair) * SRC_STRIDE
        dst_start = tl.load(dst_layer_vecs + layer) * 2 + tl.load(dst_ids + pair) * DST_STRIDE
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


class Side(NamedTuple):
    """One side of a copy as the kernel addresses it, in int64 elements from ``base``."""

    base: torch.Tensor  # flat int64 view starting at the first layer
    layer_vecs: list[int]  # each layer's start, in 16-byte units
    stride: int  # between consecutive block ids of one layer


def side(layers: Sequence[torch.Tensor], what: str) -> Side:
    """``layers`` (``[num_blocks, ...]`` each, one block's bytes contiguous, one block stride
    for all) as the kernel addresses them; layer starts relative to the first layer's."""
    first = layers[0]
    base = first.data_ptr()
    row_bytes = first[0].numel() * first.element_size()
    stride_bytes = first.stride(0) * first.element_size()
    offsets = []
    for i, layer in enumerate(layers):
        ptr = layer.data_ptr()
        if (
            ptr % VEC_BYTES
            or not layer[0].is_contiguous()
            or layer.stride(0) * layer.element_size() != stride_bytes
            or stride_bytes % VEC_BYTES
            or stride_bytes < row_bytes
        ):
            raise ValueError(
                f"TritonCopier: {what} layer {i} must keep a block contiguous, start on a "
                f"{VEC_BYTES}-byte boundary and share its block "
                "stride (a multiple of 16 bytes)"
            )
        offsets.append((ptr - base) // VEC_BYTES)
    return Side(_flat_int64(first), offsets, stride_bytes // 8)


def vec_offsets(layers: Sequence[torch.Tensor], what: str) -> list[int]:
    """Each layer's start relative to the first layer's, in 16-byte units."""
    return side(layers, what).layer_vecs


class TritonCopier:
    """Runs in a worker; owns the layer address tables of one cache/pool pair and launches the
    zero-copy block kernel on the caller's current stream.

    Each program copies one tile of one block row with 16-byte accesses; a batch is one launch
    of ``layers * pairs * tiles`` programs, whatever the runs of block ids. The pool may be
    layer-major (one contiguous tensor per layer) or block-major (a block's layers together).
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
        self.device = first.device
        self.num_layers = len(gpu_layers)
        self.row = row_bytes // 8
        self.shape = tile_shape(self.row)
        self._gpu = side(gpu_layers, "cache")
        self._cpu = side(cpu_layers, "CPU pool")
        self._gpu_vecs = torch.tensor(self._gpu.layer_vecs, dtype=torch.int64, device=self.device)
        self._cpu_vecs = torch.tensor(self._cpu.layer_vecs, dtype=torch.int64, device=self.device)
        # block-major pool: a block's layers are neighbours, so write (read) them in that order
        self._cpu_pair_major = self._cpu.stride != self.row

    def store(self, gpu_ids: torch.Tensor, cpu_ids: torch.Tensor) -> None:
        """Queue cache rows ``gpu_ids[i]`` -> CPU rows ``cpu_ids[i]`` (device int64 tensors)."""
        self.launch(self._gpu, self._cpu, self._gpu_vecs, self._cpu_vecs, gpu_ids, cpu_ids)

    def load(
        self, cpu_ids: torch.Tensor, gpu_ids: torch.Tensor, layers: tuple[int, int] | None = None
    ) -> None:
        """Queue CPU rows ``cpu_ids[i]`` -> cache rows ``gpu_ids[i]`` (device int64 tensors),
        of every layer or of layers ``[lo, hi)``."""
        lo, hi = layers or (0, self.num_layers)
        if not 0 <= lo < hi <= self.num_layers:
            raise ValueError(f"TritonCopier: layers {layers} outside 0..{self.num_layers}")
        self.launch(
            self._cpu,
            self._gpu,
            self._cpu_vecs[lo:hi],
            self._gpu_vecs[lo:hi],
            cpu_ids,
            gpu_ids,
        )

    def launch(
        self,
        src: Side,
        dst: Side,
        src_vecs: torch.Tensor,
        dst_vecs: torch.Tensor,
        src_ids: torch.Tensor,
        dst_ids: torch.Tensor,
        *,
        pair_major: bool | None = None,
    ) -> None:
        pairs = src_ids.numel()
        if pairs == 0:
            return
        shape = self.shape
        layers = src_vecs.numel()  # every layer, or a slice of the tables
        grid = (layers * pairs * shape.tiles,)
        here = self.device.index is None or torch.cuda.current_device() == self.device.index
        with nullcontext() if here else torch.cuda.device(self.device):
            _copy_blocks_kernel[grid](
                src.base,
                dst.base,
                src_ids,
                dst_ids,
                src_vecs,
                dst_vecs,
                pairs,
                ROW=self.row,
                SRC_STRIDE=src.stride,
                DST_STRIDE=dst.stride,
                LAYERS=layers,
                PAIR_MAJOR=self._cpu_pair_major if pair_major is None else pair_major,
                TILE=shape.tile,
                TILES=shape.tiles,
                EVEN=shape.even,
                num_warps=4,
            )


class TritonGather:
    """The staged strategies' ``BlockGather`` on CUDA: one kernel launch moves a chunk's blocks,
    every layer, between the cache and a block-major staging buffer ``[blocks, layers * row]``
    (int64 rows), instead of one ``index_select`` per layer."""

    def __init__(self, copier: TritonCopier, max_blocks: int) -> None:
        self._copier = copier
        layers, row = copier.num_layers, copier.row
        self._staging_vecs = torch.tensor(
            [layer * row // 2 for layer in range(layers)], dtype=torch.int64, device=copier.device
        )
        self._arange = torch.arange(max(1, max_blocks), dtype=torch.int64, device=copier.device)
        self._stride = layers * row

    def gather(self, index: torch.Tensor, out: torch.Tensor) -> None:
        """``out[i]`` = every layer of cache block ``index[i]``."""
        c = self._copier
        staging = Side(out, [], self._stride)
        ids = self._arange[: index.numel()]
        c.launch(c._gpu, staging, c._gpu_vecs, self._staging_vecs, index, ids, pair_major=True)

    def scatter(self, index: torch.Tensor, src: torch.Tensor) -> None:
        """Every layer of cache block ``index[i]`` = ``src[i]``."""
        c = self._copier
        staging = Side(src, [], self._stride)
        ids = self._arange[: index.numel()]
        c.launch(staging, c._gpu, self._staging_vecs, c._gpu_vecs, ids, index, pair_major=True)


def _flat_int64(layer: torch.Tensor) -> torch.Tensor:
    """A flat int64 tensor starting at ``layer``'s first byte (its storage to the end)."""
    storage = layer.untyped_storage()
    offset = layer.data_ptr() - storage.data_ptr()
    flat = torch.empty(0, dtype=torch.int64, device=layer.device)
    return flat.set_(storage, offset // 8, ((storage.nbytes() - offset) // 8,), (1,))
