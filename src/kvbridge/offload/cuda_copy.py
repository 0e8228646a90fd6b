"""CUDACopyBackend: batched GPU<->pinned-CPU block copies on dedicated streams."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from kvbridge.offload.copy import CopyBackend, CopyHandle, CopyPlan, plan_runs

# Upper bound of the GPU staging buffer of one batch; larger batches go through it in chunks.
DEFAULT_STAGING_BYTES = 256 << 20


class _EventHandle(CopyHandle):
    """Completion of one batch: an event on its stream, plus what must outlive the copies."""

    def __init__(self, event: torch.cuda.Event, keep_alive: tuple[torch.Tensor, ...]) -> None:
        self._event = event
        self._keep_alive = keep_alive

    def done(self) -> bool:
        if not self._event.query():
            return False
        self._keep_alive = ()
        return True

    def wait(self) -> None:
        self._event.synchronize()
        self._keep_alive = ()


class CUDACopyBackend(CopyBackend):
    """Runs in a worker; owns a load stream, a store stream and their staging buffers.

    Store (GPU -> pinned CPU), on the store stream after the work queued on the compute
    stream: per chunk, one ``index_select`` per layer gathers the blocks into a contiguous
    staging tensor, then one non-blocking copy per layer and run of consecutive CPU ids.
    Load (pinned CPU -> GPU), on the load stream after the compute stream: one non-blocking
    copy per layer and run into staging, then one ``index_copy_`` per layer into the cache.
    Chunks reuse one staging buffer; stream order keeps them apart. An event recorded after
    the last copy is what ``done()`` polls.
    """

    def __init__(
        self,
        gpu_layers: Sequence[torch.Tensor],
        cpu_layers: Sequence[torch.Tensor],
        staging_bytes: int = DEFAULT_STAGING_BYTES,
    ) -> None:
        super().__init__(gpu_layers, cpu_layers)
        first = self.gpu_layers[0]
        if first.device.type != "cuda":
            raise ValueError(f"CUDACopyBackend: KV caches are on {first.device}, not CUDA")
        if not all(t.is_pinned() for t in self.cpu_layers):
            raise ValueError("CUDACopyBackend: the CPU pool must be pinned memory")
        self.device = first.device
        self.block_shape = tuple(first.shape[1:])
        block_layer_bytes = first[0].numel() * first.element_size()
        self.chunk_blocks = max(1, staging_bytes // (block_layer_bytes * len(self.gpu_layers)))
        self.store_stream = torch.cuda.Stream(device=self.device)
        self.load_stream = torch.cuda.Stream(device=self.device)

    @classmethod
    def allocate_cpu_layers(
        cls, gpu_layers: Sequence[torch.Tensor], num_cpu_blocks: int
    ) -> list[torch.Tensor]:
        first = gpu_layers[0]
        shape = (len(gpu_layers), num_cpu_blocks, *first.shape[1:])
        pool = torch.empty(shape, dtype=first.dtype, device="cpu", pin_memory=True)
        return list(pool.unbind(0))

    def store(self, gpu_ids: Sequence[int], cpu_ids: Sequence[int]) -> CopyHandle:
        plan = plan_runs(cpu_ids, gpu_ids)
        stream = self.store_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            index_host, index, staging = self._prepare(plan)
            staged_store(self.gpu_layers, self.cpu_layers, plan, index, staging)
            return self._finish(stream, index_host, index, staging)

    def load(self, cpu_ids: Sequence[int], gpu_ids: Sequence[int]) -> CopyHandle:
        plan = plan_runs(cpu_ids, gpu_ids)
        stream = self.load_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            index_host, index, staging = self._prepare(plan)
            staged_load(self.gpu_layers, self.cpu_layers, plan, index, staging)
            return self._finish(stream, index_host, index, staging)

    def shutdown(self) -> None:
        self.store_stream.synchronize()
        self.load_stream.synchronize()

    # -- helpers (called with the copy stream current) ---------------------------------------
    def _prepare(self, plan: CopyPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index_host = torch.tensor(plan.other, dtype=torch.int64).pin_memory()
        index = index_host.to(self.device, non_blocking=True)
        rows = max(1, min(len(plan.keyed), self.chunk_blocks))
        staging = torch.empty(
            (len(self.gpu_layers), rows, *self.block_shape),
            dtype=self.gpu_layers[0].dtype,
            device=self.device,
        )
        return index_host, index, staging

    @staticmethod
    def _finish(stream: torch.cuda.Stream, *keep_alive: torch.Tensor) -> CopyHandle:
        event = torch.cuda.Event()
        event.record(stream)
        return _EventHandle(event, keep_alive)


# -- the copy sequences (device-agnostic, so CPU tests can check their arithmetic) -------------
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
    for lo in range(0, total, chunk):
        hi = min(total, lo + chunk)
        runs = []
        for offset, length in plan.runs:
            a, b = max(offset, lo), min(offset + length, hi)
            if a < b:
                runs.append((a, b - a))
        yield lo, hi, runs
