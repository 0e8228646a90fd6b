"""CPUCopyBackend: synchronous block copies when the KV cache itself lives in CPU memory."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvbridge.offload.copy import CopyBackend, CopyHandle, DoneHandle, plan_runs

# Widest element types a block row may be viewed as, so the elementwise index_copy_ kernel
# moves 16 or 8 bytes per element instead of 2 (the bytes are only moved, never converted).
_WIDE_DTYPES = (torch.complex128, torch.int64, torch.int32, torch.int16, torch.uint8)


class CPUCopyBackend(CopyBackend):
    """Runs in a worker; copies blocks between CPU tensors, one op per run of CPU ids and layer.

    Store: ``index_select`` gathers the cache blocks straight into each run of consecutive
    CPU blocks (a row memcpy, no temporary). Load: ``index_copy_`` scatters each run of
    consecutive CPU blocks into the cache blocks. The pool hands out consecutive ids, so a
    step is usually one op per layer and direction.
    """

    @classmethod
    def allocate_cpu_layers(
        cls, gpu_layers: Sequence[torch.Tensor], num_cpu_blocks: int
    ) -> list[torch.Tensor]:
        first = gpu_layers[0]
        pool = torch.empty(
            (len(gpu_layers), num_cpu_blocks, *first.shape[1:]), dtype=first.dtype, device="cpu"
        )
        return list(pool.unbind(0))

    def store(self, gpu_ids: Sequence[int], cpu_ids: Sequence[int]) -> CopyHandle:
        plan = plan_runs(cpu_ids, gpu_ids)
        if plan.runs:
            index = torch.tensor(plan.other, dtype=torch.int64)
            for gpu, cpu in zip(self.gpu_layers, self.cpu_layers):
                for offset, length in plan.runs:
                    start = plan.keyed[offset]
                    torch.index_select(
                        gpu, 0, index[offset : offset + length], out=cpu[start : start + length]
                    )
        return DoneHandle()

    def load(self, cpu_ids: Sequence[int], gpu_ids: Sequence[int]) -> CopyHandle:
        plan = plan_runs(cpu_ids, gpu_ids)
        if plan.runs:
            index = torch.tensor(plan.other, dtype=torch.int64)
            for gpu, cpu in zip(self.gpu_layers, self.cpu_layers):
                dst = _wide_rows(gpu)
                for offset, length in plan.runs:
                    start = plan.keyed[offset]
                    src = _wide_rows(cpu[start : start + length])
                    dst.index_copy_(0, index[offset : offset + length], src)
        return DoneHandle()


def _wide_rows(blocks: torch.Tensor) -> torch.Tensor:
    """``blocks`` as ``[num_blocks, row]`` of the widest dtype that divides a block's bytes."""
    rows = blocks.view(blocks.shape[0], -1)
    row_bytes = rows.shape[1] * rows.element_size()
    for dtype in _WIDE_DTYPES:
        if row_bytes % dtype.itemsize == 0:
            return rows.view(dtype)
    return rows
