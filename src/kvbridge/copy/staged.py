"""Staged copies: chunk planning and the fill/drain sequences, device-agnostic.

A staged copy moves a batch through staging buffers in chunks. Each chunk is *filled* (store:
gathered from the cache; load: copied in from the host side) and then *drained* (store: copied
out to the host side; load: scattered into the cache). Pipelined: with ``num_buffers`` buffers
used in rotation, the fill of chunk ``c + 1`` overlaps the drain of chunk ``c``; a
``StageSync`` keeps two uses of one buffer apart. Serial: one buffer, no overlap. Everything
here runs on CPU tensors too, so tests can check the arithmetic without a GPU.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import NamedTuple, Protocol

import torch

from kvbridge.copy.backend import CopyPlan

# Element types a block row may be viewed as, widest first: the index kernels then move 8
# bytes per element instead of 2 (the bytes are only moved, never converted).
WIDE_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


class Segment(NamedTuple):
    """Pairs ``lo:hi`` of a plan in one layer, staged from row ``row`` of its chunk's buffer.

    ``runs`` are the plan's runs of consecutive CPU ids clipped to ``lo:hi``, as
    ``(offset, length)`` into the plan.
    """

    layer: int
    lo: int
    hi: int
    row: int
    runs: list[tuple[int, int]]


class StagedChunk(NamedTuple):
    """One fill and one drain of staging buffer ``buffer``, ``rows`` rows used."""

    buffer: int
    rows: int
    segments: list[Segment]


class StageSync(Protocol):
    """Where fills and drains run, and what each waits for (CUDA: streams and events)."""

    def fill(self, buffer: int) -> AbstractContextManager[object]:
        """Around a fill of ``buffer``: after the buffer's previous drain."""
        ...

    def drain(self, buffer: int) -> AbstractContextManager[object]:
        """Around a drain of ``buffer``: after its fill."""
        ...


class InOrder:
    """A ``StageSync`` for synchronous devices: program order already separates the uses."""

    def fill(self, buffer: int) -> AbstractContextManager[object]:
        return nullcontext()

    def drain(self, buffer: int) -> AbstractContextManager[object]:
        return nullcontext()


def plan_chunks(
    plan: CopyPlan, num_layers: int, chunk_rows: int, num_buffers: int
) -> list[StagedChunk]:
    """Pack every (layer, pair) of ``plan`` into chunks of at most ``chunk_rows`` rows.

    Layer-major, so one layer's pairs stay together (large copies per run); a chunk holds
    several small layers or a piece of a large one. Chunk ``c`` uses buffer
    ``c % num_buffers``.
    """
    if chunk_rows < 1 or num_buffers < 1:
        raise ValueError(
            f"plan_chunks: chunk_rows and num_buffers must be >= 1, got {chunk_rows}, {num_buffers}"
        )
    total = len(plan.keyed)
    run_starts = [offset for offset, _ in plan.runs]
    chunks: list[StagedChunk] = []
    segments: list[Segment] = []
    used = 0
    for layer in range(num_layers if total else 0):
        lo = 0
        while lo < total:
            hi = min(total, lo + chunk_rows - used)
            segments.append(Segment(layer, lo, hi, used, clip_runs(plan, run_starts, lo, hi)))
            used += hi - lo
            lo = hi
            if used == chunk_rows:
                chunks.append(StagedChunk(len(chunks) % num_buffers, used, segments))
                segments, used = [], 0
    if segments:
        chunks.append(StagedChunk(len(chunks) % num_buffers, used, segments))
    return chunks


def clip_runs(plan: CopyPlan, run_starts: Sequence[int], lo: int, hi: int) -> list[tuple[int, int]]:
    """The runs of ``plan`` (their offsets are ``run_starts``) clipped to pairs ``lo:hi``."""
    clipped = []
    for i in range(max(0, bisect_right(run_starts, lo) - 1), len(plan.runs)):
        offset, length = plan.runs[i]
        if offset >= hi:
            break
        a, b = max(offset, lo), min(offset + length, hi)
        if a < b:
            clipped.append((a, b - a))
    return clipped


def pipelined_store(
    gpu_rows: Sequence[torch.Tensor],
    cpu_rows: Sequence[torch.Tensor],
    plan: CopyPlan,
    index: torch.Tensor,
    buffers: Sequence[torch.Tensor],
    chunks: Sequence[StagedChunk],
    sync: StageSync,
) -> None:
    """Fill: gather each segment's cache rows. Drain: one copy per run into the CPU pool."""
    for chunk, buf in _with_buffers(chunks, buffers):
        with sync.fill(chunk.buffer):
            for seg in chunk.segments:
                out = buf[seg.row : seg.row + seg.hi - seg.lo]
                torch.index_select(gpu_rows[seg.layer], 0, index[seg.lo : seg.hi], out=out)
        with sync.drain(chunk.buffer):
            for seg, start, row, length in _run_copies(plan, chunk):
                cpu_rows[seg.layer][start : start + length].copy_(
                    buf[row : row + length], non_blocking=True
                )


def pipelined_load(
    gpu_rows: Sequence[torch.Tensor],
    cpu_rows: Sequence[torch.Tensor],
    plan: CopyPlan,
    index: torch.Tensor,
    buffers: Sequence[torch.Tensor],
    chunks: Sequence[StagedChunk],
    sync: StageSync,
) -> None:
    """Fill: one copy per run from the CPU pool. Drain: scatter each segment into the cache."""
    for chunk, buf in _with_buffers(chunks, buffers):
        with sync.fill(chunk.buffer):
            for seg, start, row, length in _run_copies(plan, chunk):
                buf[row : row + length].copy_(
                    cpu_rows[seg.layer][start : start + length], non_blocking=True
                )
        with sync.drain(chunk.buffer):
            for seg in chunk.segments:
                src = buf[seg.row : seg.row + seg.hi - seg.lo]
                gpu_rows[seg.layer].index_copy_(0, index[seg.lo : seg.hi], src)


def allocate_host_pool(
    gpu_layers: Sequence[torch.Tensor], num_cpu_blocks: int, *, block_major: bool, pin: bool
) -> list[torch.Tensor]:
    """``CopyBackend.allocate_cpu_layers`` for every backend (``pin``: page-locked memory)."""
    first, n = gpu_layers[0], len(gpu_layers)
    shape = (num_cpu_blocks, n) if block_major else (n, num_cpu_blocks)
    pool = torch.empty((*shape, *first.shape[1:]), dtype=first.dtype, device="cpu", pin_memory=pin)
    return list(pool.unbind(1 if block_major else 0))


def wide_rows(blocks: torch.Tensor, dtypes: Sequence[torch.dtype] = WIDE_DTYPES) -> torch.Tensor:
    """``blocks`` as ``[num_blocks, row]`` of the widest of ``dtypes`` (widest first) that
    divides a block's bytes."""
    rows = blocks.view(blocks.shape[0], -1)
    row_bytes = rows.shape[1] * rows.element_size()
    for dtype in dtypes:
        if row_bytes % dtype.itemsize == 0:
            return rows.view(dtype)
    return rows


def _with_buffers(
    chunks: Sequence[StagedChunk], buffers: Sequence[torch.Tensor]
) -> Iterator[tuple[StagedChunk, torch.Tensor]]:
    for chunk in chunks:
        buf = buffers[chunk.buffer]
        if chunk.rows > buf.shape[0]:
            raise ValueError(f"staged copy: chunk of {chunk.rows} rows, buffer of {buf.shape[0]}")
        yield chunk, buf


def _run_copies(plan: CopyPlan, chunk: StagedChunk) -> Iterator[tuple[Segment, int, int, int]]:
    """``(segment, first CPU id, first staging row, length)`` for each run of a chunk."""
    for seg in chunk.segments:
        for offset, length in seg.runs:
            yield seg, plan.keyed[offset], seg.row + offset - seg.lo, length


# -- the serial sequences: one staging buffer, no overlap (the CUDA backend's "serial") ------
def staged_store(
    gpu_layers: Sequence[torch.Tensor],
    cpu_layers: Sequence[torch.Tensor],
    plan: CopyPlan,
    index: torch.Tensor,
    staging: torch.Tensor,
) -> None:
    """Per chunk: gather ``index`` blocks of each layer into staging, copy each CPU run out."""
    for lo, hi, runs in chunk_runs(plan, staging.shape[1]):
        for layer, (gpu, cpu) in enumerate(zip(gpu_layers, cpu_layers)):
            torch.index_select(gpu, 0, index[lo:hi], out=staging[layer, : hi - lo])
            for offset, length in runs:
                start = plan.keyed[offset]
                cpu[start : start + length].copy_(
                    staging[layer, offset - lo : offset - lo + length], non_blocking=True
                )


def staged_load(
    gpu_layers: Sequence[torch.Tensor],
    cpu_layers: Sequence[torch.Tensor],
    plan: CopyPlan,
    index: torch.Tensor,
    staging: torch.Tensor,
) -> None:
    """Per chunk: copy each CPU run into staging, scatter each layer to the ``index`` blocks."""
    for lo, hi, runs in chunk_runs(plan, staging.shape[1]):
        for layer, (gpu, cpu) in enumerate(zip(gpu_layers, cpu_layers)):
            for offset, length in runs:
                start = plan.keyed[offset]
                staging[layer, offset - lo : offset - lo + length].copy_(
                    cpu[start : start + length], non_blocking=True
                )
            gpu.index_copy_(0, index[lo:hi], staging[layer, : hi - lo])


def chunk_runs(plan: CopyPlan, chunk: int) -> Iterator[tuple[int, int, list[tuple[int, int]]]]:
    """``(lo, hi, runs)`` for each chunk of at most ``chunk`` pairs, runs clipped to it."""
    if chunk < 1:
        raise ValueError(f"chunk_runs: chunk must be >= 1, got {chunk}")
    total = len(plan.keyed)
    run_starts = [offset for offset, _ in plan.runs]
    for lo in range(0, total, chunk):
        hi = min(total, lo + chunk)
        yield lo, hi, clip_runs(plan, run_starts, lo, hi)
