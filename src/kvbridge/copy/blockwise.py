"""Staged copies for a block-major CPU pool: a CPU block holds every layer of it, contiguously.

With a layer-major pool, CPU block ``b`` is ``layers`` separate rows, so a batch of scattered
CPU ids costs ``layers`` PCIe copies per run of ids (32 copies of 64 KiB for one Llama-8B
block). With a block-major pool (``[num_cpu_blocks, layers, *block]``, a layer is a strided
view) it costs one copy per run. The GPU cache stays per layer, so each chunk of pairs is
*gathered* on the GPU (HBM is ~80x faster than PCIe) into a block-major staging buffer
``[blocks, layers * row]``, then copied out with one copy per run of CPU ids; loads do the
reverse. Chunk ``c`` uses buffer ``c % num_buffers``, and a ``StageSync`` keeps two uses of
one buffer apart (fill: gather or copy in; drain: copy out or scatter), as in ``staged``.
Everything here runs on CPU tensors too.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple, Protocol

import torch

from kvbridge.copy.backend import CopyPlan
from kvbridge.copy.dma import Copier
from kvbridge.copy.staged import StageSync, clip_runs


class BlockChunk(NamedTuple):
    """Pairs ``lo:hi`` of a plan through buffer ``buffer``; ``runs`` as ``(offset, length)``
    into the plan, clipped to ``lo:hi``."""

    buffer: int
    lo: int
    hi: int
    runs: list[tuple[int, int]]


def plan_block_chunks(plan: CopyPlan, chunk_blocks: int, num_buffers: int) -> list[BlockChunk]:
    """Chunks of at most ``chunk_blocks`` pairs, in plan order, rotating ``num_buffers``
    (each chunk's runs found by bisection: a scattered batch has thousands of runs)."""
    if num_buffers < 1 or chunk_blocks < 1:
        raise ValueError(
            f"plan_block_chunks: chunk_blocks and num_buffers must be >= 1, got "
            f"{chunk_blocks}, {num_buffers}"
        )
    starts = [offset for offset, _ in plan.runs]
    total = len(plan.keyed)
    return [
        BlockChunk(i % num_buffers, lo, min(total, lo + chunk_blocks), runs)
        for i, lo in enumerate(range(0, total, chunk_blocks))
        for runs in [clip_runs(plan, starts, lo, min(total, lo + chunk_blocks))]
    ]


class BlockGather(Protocol):
    """Moves whole blocks (every layer) between the cache and ``[blocks, layers * row]``."""

    def gather(self, index: torch.Tensor, out: torch.Tensor) -> None:
        """``out[i]`` = every layer of cache block ``index[i]``."""
        ...

    def scatter(self, index: torch.Tensor, src: torch.Tensor) -> None:
        """Every layer of cache block ``index[i]`` = ``src[i]``."""
        ...


class TorchGather:
    """``BlockGather`` with one ``index_select`` / ``index_copy_`` per layer (any device)."""

    def __init__(self, gpu_rows: Sequence[torch.Tensor]) -> None:
        self._rows = list(gpu_rows)  # per layer [num_blocks, row]

    def _layers(self, staged: torch.Tensor) -> torch.Tensor:
        return staged.view(staged.shape[0], len(self._rows), -1)

    def gather(self, index: torch.Tensor, out: torch.Tensor) -> None:
        staged = self._layers(out)
        for layer, rows in enumerate(self._rows):
            torch.index_select(rows, 0, index, out=staged[:, layer])

    def scatter(self, index: torch.Tensor, src: torch.Tensor) -> None:
        staged = self._layers(src)
        for layer, rows in enumerate(self._rows):
            rows.index_copy_(0, index, staged[:, layer])


def pool_blocks(cpu_layers: Sequence[torch.Tensor], row_dtype: torch.dtype) -> torch.Tensor | None:
    """A block-major pool's blocks as ``[num_cpu_blocks, layers * row]`` of ``row_dtype``
    (rows strided when the pool has more layer slots than ``cpu_layers``), or None when the
    layers are not consecutive slots of one block-major pool."""
    first = cpu_layers[0]
    size = first.element_size()
    block_bytes = first[0].numel() * size
    stride = first.stride(0) * size
    span = block_bytes * len(cpu_layers)
    if stride < span or stride % row_dtype.itemsize:
        return None
    for i, layer in enumerate(cpu_layers):
        if (
            layer.data_ptr() != first.data_ptr() + i * block_bytes
            or layer.stride(0) != first.stride(0)
            or not layer[0].is_contiguous()
        ):
            return None
    unit = row_dtype.itemsize
    storage = first.untyped_storage()
    offset = first.data_ptr() - storage.data_ptr()
    if offset % unit or block_bytes % unit:
        return None
    flat = torch.empty(0, dtype=row_dtype, device=first.device)
    return flat.set_(storage, offset // unit, (first.shape[0], span // unit), (stride // unit, 1))


def blockwise_store(
    gather: BlockGather,
    cpu_blocks: torch.Tensor,
    plan: CopyPlan,
    index: torch.Tensor,
    buffers: Sequence[torch.Tensor],
    chunks: Sequence[BlockChunk],
    sync: StageSync,
    copy: Copier,
) -> Iterator[None]:
    """Fill: gather a chunk's cache blocks. Drain: one copy per run into the CPU pool.
    Yields after each chunk (so a caller can interleave two batches); ``run`` drives it."""
    for chunk in chunks:
        buf = _buffer(buffers, chunk)
        with sync.fill(chunk.buffer):
            gather.gather(index[chunk.lo : chunk.hi], buf[: chunk.hi - chunk.lo])
        with sync.drain(chunk.buffer):
            copy(cpu_blocks, buf, [(plan.keyed[o], o - chunk.lo, n) for o, n in chunk.runs])
        yield


def blockwise_load(
    gather: BlockGather,
    cpu_blocks: torch.Tensor,
    plan: CopyPlan,
    index: torch.Tensor,
    buffers: Sequence[torch.Tensor],
    chunks: Sequence[BlockChunk],
    sync: StageSync,
    copy: Copier,
) -> Iterator[None]:
    """Fill: one copy per run from the CPU pool. Drain: scatter the chunk into the cache.
    Yields after each chunk, as ``blockwise_store``."""
    for chunk in chunks:
        buf = _buffer(buffers, chunk)
        with sync.fill(chunk.buffer):
            copy(buf, cpu_blocks, [(o - chunk.lo, plan.keyed[o], n) for o, n in chunk.runs])
        with sync.drain(chunk.buffer):
            gather.scatter(index[chunk.lo : chunk.hi], buf[: chunk.hi - chunk.lo])
        yield


def layerwise_load(
    cpu_blocks: torch.Tensor,
    gpu_rows: Sequence[torch.Tensor],
    plan: CopyPlan,
    index: torch.Tensor,
    buffers: Sequence[torch.Tensor],
    layer_chunks: Sequence[tuple[int, int]],
    sync: StageSync,
    copy: Copier,
) -> Iterator[int]:
    """A load in chunks of layers ``[lo, hi)``, in order: per chunk, the columns of those
    layers of each run of CPU ids (one strided copy per run; a block-major pool keeps a
    block's layers side by side), then one scatter per layer. A chunk goes through the buffers
    in slices of at most ``buffers[0].shape[0]`` pairs, rotating buffers; yields the chunk's
    number once its last scatter is queued (its layers are in place after that)."""
    row = gpu_rows[0].shape[1]
    rows = buffers[0].shape[0]
    slices = plan_block_chunks(plan, rows, 1)
    turn = 0
    for c, (lo, hi) in enumerate(layer_chunks):
        columns = cpu_blocks[:, lo * row : hi * row]
        for part in slices:
            b = turn % len(buffers)
            turn += 1
            buf = buffers[b][: part.hi - part.lo, : (hi - lo) * row]
            with sync.fill(b):
                copy(buf, columns, [(o - part.lo, plan.keyed[o], n) for o, n in part.runs])
            with sync.drain(b):
                ids = index[part.lo : part.hi]
                for k, layer in enumerate(range(lo, hi)):
                    gpu_rows[layer].index_copy_(0, ids, buf[:, k * row : (k + 1) * row])
        yield c


def run(steps: Iterable[None]) -> None:
    """Drive a sequence of steps to its end."""
    for _ in steps:
        pass


def _buffer(buffers: Sequence[torch.Tensor], chunk: BlockChunk) -> torch.Tensor:
    buf = buffers[chunk.buffer]
    if chunk.hi - chunk.lo > buf.shape[0]:
        raise ValueError(
            f"blockwise copy: chunk of {chunk.hi - chunk.lo} blocks, buffer of {buf.shape[0]}"
        )
    return buf
