"""CPUCopyBackend: synchronous block copies when the KV cache itself lives in CPU memory."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvbridge.copy.backend import CopyBackend, CopyHandle, DoneHandle, plan_runs
from kvbridge.copy.staged import WIDE_DTYPES, allocate_host_pool, wide_rows

# On the CPU the elementwise index_copy_ kernel also moves 16-byte elements.
_CPU_WIDE_DTYPES = (torch.complex128, *WIDE_DTYPES)


class CPUCopyBackend(CopyBackend):
    """Runs in a worker; copies blocks between CPU tensors, one op per run of CPU ids and layer.

    Store: ``index_select`` gathers the cache blocks straight into each run of consecutive
    CPU blocks (a row memcpy, no temporary). Load: ``index_copy_`` scatters each run of
    consecutive CPU blocks into the cache blocks. The pool hands out consecutive ids, so a
    step is usually one op per layer and direction. Either pool layout works (the ops write
    strided views of a block-major pool in place).
    """

    @classmethod
    def allocate_cpu_layers(
        cls, gpu_layers: Sequence[torch.Tensor], num_cpu_blocks: int, *, block_major: bool = False
    ) -> list[torch.Tensor]:
        return allocate_host_pool(gpu_layers, num_cpu_blocks, block_major=block_major, pin=False)

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
                dst = wide_rows(gpu, _CPU_WIDE_DTYPES)
                for offset, length in plan.runs:
                    start = plan.keyed[offset]
                    src = wide_rows(cpu[start : start + length], _CPU_WIDE_DTYPES)
                    dst.index_copy_(0, index[offset : offset + length], src)
        return DoneHandle()
