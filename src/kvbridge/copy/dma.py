"""Copy-engine copies between pinned host memory and the GPU, one runtime call each.

``torch.Tensor.copy_`` between a pinned slice and a device slice costs several microseconds of
host time (dispatch, checks, an event for the pinned-memory cache) on top of the
``cudaMemcpyAsync`` it issues; a staged copy of scattered CPU blocks issues one per run, so on
small runs the host, not PCIe, sets the pace. ``RawCopier`` calls ``cudaMemcpy2DAsync``
(``cudaMemcpyDefault``: the direction follows from the unified addresses) of the CUDA runtime
torch itself loaded, through ctypes, for every run of a chunk in one Python call;
``torch_copy`` is the fallback (and the CPU tests' copier).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch


class Copier(Protocol):
    """Queues row copies between two ``[rows, width]`` tensors (rows contiguous, any row
    stride) on the current stream: for each ``(dst_row, src_row, rows)`` of ``runs``,
    ``dst[dst_row : dst_row + rows] = src[src_row : src_row + rows]``."""

    def __call__(
        self, dst: torch.Tensor, src: torch.Tensor, runs: Sequence[tuple[int, int, int]]
    ) -> None: ...


def torch_copy(dst: torch.Tensor, src: torch.Tensor, runs: Sequence[tuple[int, int, int]]) -> None:
    """``Copier`` through ``Tensor.copy_`` (any device; the CPU tests' copier)."""
    for d, s, rows in runs:
        dst[d : d + rows].copy_(src[s : s + rows], non_blocking=True)


def _loaded_cudart() -> str | None:
    """The path of the ``libcudart`` this process mapped (torch's), if any."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        fields = line.split()
        if fields and "/libcudart.so" in fields[-1]:
            return fields[-1]
    return None


class RawCopier:
    """``Copier`` with one ``cudaMemcpy2DAsync`` per run through ctypes, the addresses worked
    out once per call: a few microseconds a run where ``Tensor.copy_`` took ~30 (measured on
    one H200, slicing included)."""

    def __init__(self, device: torch.device) -> None:
        path = _loaded_cudart()
        if path is None:
            raise OSError("no libcudart mapped in this process")
        fn = ctypes.CDLL(path).cudaMemcpy2DAsync
        fn.restype = ctypes.c_int
        size_t, ptr = ctypes.c_size_t, ctypes.c_void_p
        fn.argtypes = [ptr, size_t, ptr, size_t, size_t, size_t, ctypes.c_int, ptr]
        self._fn = fn
        self._stream = lambda: torch.cuda.current_stream(device).cuda_stream

    def __call__(
        self, dst: torch.Tensor, src: torch.Tensor, runs: Sequence[tuple[int, int, int]]
    ) -> None:
        size = dst.element_size()
        width = dst.shape[1] * size
        if (
            dst.dim() != 2
            or src.dim() != 2
            or src.shape[1] * src.element_size() != width
            or dst.stride(1) != 1
            or src.stride(1) != 1
        ):
            raise ValueError(f"RawCopier: needs [rows, width] pairs, got {dst.shape}, {src.shape}")
        for d, s, rows in runs:  # raw addresses: check every run is inside both tensors
            if rows < 1 or d < 0 or s < 0 or d + rows > dst.shape[0] or s + rows > src.shape[0]:
                raise ValueError(f"RawCopier: run {(d, s, rows)} outside {dst.shape}/{src.shape}")
        dpitch, spitch = dst.stride(0) * size, src.stride(0) * src.element_size()
        dst0, src0 = dst.data_ptr(), src.data_ptr()
        stream = self._stream()
        fn = self._fn
        for d, s, rows in runs:
            err = fn(dst0 + d * dpitch, dpitch, src0 + s * spitch, spitch, width, rows, 4, stream)
            if err:
                raise RuntimeError(f"cudaMemcpy2DAsync failed with CUDA error {err}")


def copier_for(device: torch.device) -> Copier:
    """``RawCopier`` where the CUDA runtime is found, else ``torch_copy``."""
    if device.type == "cuda":
        try:
            return RawCopier(device)
        except (OSError, AttributeError):
            pass
    return torch_copy
