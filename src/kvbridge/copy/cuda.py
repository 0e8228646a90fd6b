"""CUDACopyBackend: batched GPU<->pinned-CPU block copies on dedicated streams."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from kvbridge.copy.backend import (
    CopyBackend,
    CopyHandle,
    CopyPlan,
    parse_strategy,
    plan_runs,
)
from kvbridge.copy.staged import (
    pipelined_load,
    pipelined_store,
    plan_chunks,
    staged_load,
    staged_store,
    wide_rows,
)

if TYPE_CHECKING:
    from kvbridge.copy.triton_copier import TritonCopier

DEFAULT_STRATEGY = "pipelined"
# serial: upper bound of the one GPU staging buffer of a batch, larger batches go in chunks.
DEFAULT_STAGING_BYTES = 256 << 20
# pipelined: size of each of the rotating staging buffers.
DEFAULT_CHUNK_BYTES = 32 << 20
DEFAULT_NUM_BUFFERS = 2


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


class _StreamSync:
    """Fills on one stream, drains on another; events keep two uses of a buffer apart."""

    def __init__(self, fill: torch.cuda.Stream, drain: torch.cuda.Stream, buffers: int) -> None:
        self.fill_stream, self.drain_stream = fill, drain
        self._filled = [torch.cuda.Event() for _ in range(buffers)]
        self._drained: list[torch.cuda.Event | None] = [None] * buffers

    @contextmanager
    def fill(self, buffer: int) -> Iterator[None]:
        with torch.cuda.stream(self.fill_stream):
            drained = self._drained[buffer]
            if drained is not None:
                self.fill_stream.wait_event(drained)
            yield
            self._filled[buffer].record(self.fill_stream)

    @contextmanager
    def drain(self, buffer: int) -> Iterator[None]:
        with torch.cuda.stream(self.drain_stream):
            self.drain_stream.wait_event(self._filled[buffer])
            yield
            drained = self._drained[buffer] or torch.cuda.Event()
            drained.record(self.drain_stream)
            self._drained[buffer] = drained


class CUDACopyBackend(CopyBackend):
    """Runs in a worker; owns the copy streams and the direct copier of one cache/pool pair.

    Staging buffers come from the caching allocator per batch and live as long as the batch.
    Copies of a batch wait for the work queued on the compute stream; an event recorded after
    the last one is what ``done()`` polls. ``copy_strategy`` (``parse_strategy``) picks how:
    - serial: per chunk of blocks, ``index_select`` gathers each layer into one GPU staging
      buffer, then one non-blocking copy per layer and run of CPU ids (loads: the reverse,
      ``index_copy_`` last), all on one stream.
    - pipelined: the same ops, layer-major in chunks of ``chunk_bytes`` through
      ``num_buffers`` rotating buffers; the gather (load: the scatter) runs on the direction's
      stream and the PCIe copies on a second one, so consecutive chunks overlap.
    - direct: one Triton kernel per batch reads or writes the pinned pool through mapped
      memory, no staging (``triton_copier``).
    """

    def __init__(
        self,
        gpu_layers: Sequence[torch.Tensor],
        cpu_layers: Sequence[torch.Tensor],
        copy_strategy: str | None = None,
        staging_bytes: int = DEFAULT_STAGING_BYTES,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        num_buffers: int = DEFAULT_NUM_BUFFERS,
    ) -> None:
        self.strategy = parse_strategy(copy_strategy or DEFAULT_STRATEGY)
        super().__init__(gpu_layers, cpu_layers)
        first = self.gpu_layers[0]
        if first.device.type != "cuda":
            raise ValueError(f"CUDACopyBackend: KV caches are on {first.device}, not CUDA")
        if not all(t.is_pinned() for t in self.cpu_layers):
            raise ValueError("CUDACopyBackend: the CPU pool must be pinned memory")
        if num_buffers < 1:
            raise ValueError(f"CUDACopyBackend: num_buffers must be >= 1, got {num_buffers}")
        self.device = first.device
        self.block_shape = tuple(first.shape[1:])
        block_layer_bytes = first[0].numel() * first.element_size()
        self.chunk_blocks = max(1, staging_bytes // (block_layer_bytes * len(self.gpu_layers)))
        self.chunk_rows = max(1, chunk_bytes // block_layer_bytes)
        self.num_buffers = num_buffers
        self.gpu_rows = [wide_rows(t) for t in self.gpu_layers]
        self.cpu_rows = [wide_rows(t) for t in self.cpu_layers]
        self.store_stream = torch.cuda.Stream(device=self.device)
        self.load_stream = torch.cuda.Stream(device=self.device)
        self.store_copy_stream = torch.cuda.Stream(device=self.device)
        self.load_copy_stream = torch.cuda.Stream(device=self.device)
        self._direct: TritonCopier | None = None
        if "direct" in self.strategy:
            from kvbridge.copy.triton_copier import TritonCopier

            self._direct = TritonCopier(self.gpu_layers, self.cpu_layers)

    @classmethod
    def allocate_cpu_layers(
        cls, gpu_layers: Sequence[torch.Tensor], num_cpu_blocks: int
    ) -> list[torch.Tensor]:
        first = gpu_layers[0]
        shape = (len(gpu_layers), num_cpu_blocks, *first.shape[1:])
        pool = torch.empty(shape, dtype=first.dtype, device="cpu", pin_memory=True)
        return list(pool.unbind(0))

    def store(self, gpu_ids: Sequence[int], cpu_ids: Sequence[int]) -> CopyHandle:
        return self._copy(plan_runs(cpu_ids, gpu_ids), is_load=False)

    def load(self, cpu_ids: Sequence[int], gpu_ids: Sequence[int]) -> CopyHandle:
        return self._copy(plan_runs(cpu_ids, gpu_ids), is_load=True)

    def shutdown(self) -> None:
        for stream in (self.store_stream, self.store_copy_stream):
            stream.synchronize()
        for stream in (self.load_stream, self.load_copy_stream):
            stream.synchronize()

    # -- helpers ------------------------------------------------------------------------------
    def _copy(self, plan: CopyPlan, *, is_load: bool) -> CopyHandle:
        strategy = self.strategy.load if is_load else self.strategy.store
        stream = self.load_stream if is_load else self.store_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            if not plan.keyed:
                return _recorded(stream)
            # row 0: cache ids, row 1: CPU ids, both sorted by CPU id
            ids_host = torch.tensor([plan.other, plan.keyed], dtype=torch.int64).pin_memory()
            ids = ids_host.to(self.device, non_blocking=True)
            if strategy == "direct" and self._direct is not None:
                if is_load:
                    self._direct.load(ids[1], ids[0])
                else:
                    self._direct.store(ids[0], ids[1])
                return _recorded(stream, ids_host, ids)
            if strategy == "serial":
                staging = self._staging(min(len(plan.keyed), self.chunk_blocks), count=0)[0]
                copy = staged_load if is_load else staged_store
                copy(self.gpu_layers, self.cpu_layers, plan, ids[0], staging)
                return _recorded(stream, ids_host, ids, staging)
            return self._pipelined(plan, ids_host, ids, is_load=is_load)

    def _pipelined(
        self, plan: CopyPlan, ids_host: torch.Tensor, ids: torch.Tensor, *, is_load: bool
    ) -> CopyHandle:
        """Called with the direction's stream current; it gathers (store) or scatters (load)."""
        chunks = plan_chunks(plan, len(self.gpu_layers), self.chunk_rows, self.num_buffers)
        rows = max(c.rows for c in chunks)
        buffers = self._staging(rows, count=min(self.num_buffers, len(chunks)))
        if is_load:
            sync = _StreamSync(self.load_copy_stream, self.load_stream, self.num_buffers)
            run = pipelined_load
        else:
            sync = _StreamSync(self.store_stream, self.store_copy_stream, self.num_buffers)
            run = pipelined_store
        for buf in buffers:
            buf.record_stream(self.load_copy_stream if is_load else self.store_copy_stream)
        run(self.gpu_rows, self.cpu_rows, plan, ids[0], buffers, chunks, sync)
        return _recorded(sync.drain_stream, ids_host, ids, *buffers)

    def _staging(self, rows: int, *, count: int) -> list[torch.Tensor]:
        """``count`` buffers of ``rows`` wide rows; ``count=0``: one ``[layers, rows, *block]``."""
        if not count:
            shape = (len(self.gpu_layers), rows, *self.block_shape)
            return [torch.empty(shape, dtype=self.gpu_layers[0].dtype, device=self.device)]
        like = self.gpu_rows[0]
        return [
            torch.empty((rows, like.shape[1]), dtype=like.dtype, device=self.device)
            for _ in range(count)
        ]


def _recorded(stream: torch.cuda.Stream, *keep_alive: torch.Tensor) -> CopyHandle:
    event = torch.cuda.Event()
    event.record(stream)
    return _EventHandle(event, keep_alive)
