"""CUDACopyBackend: batched GPU<->pinned-CPU block copies on dedicated streams."""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
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
from kvbridge.copy.blockwise import (
    BlockGather,
    TorchGather,
    blockwise_load,
    blockwise_store,
    layerwise_load,
    plan_block_chunks,
    pool_blocks,
)
from kvbridge.copy.dma import copier_for
from kvbridge.copy.staged import (
    allocate_host_pool,
    pipelined_load,
    pipelined_store,
    plan_chunks,
    staged_load,
    staged_store,
    wide_rows,
)

if TYPE_CHECKING:
    from kvbridge.copy.triton_copier import TritonCopier

DEFAULT_STRATEGY = "auto"
# serial: upper bound of the one GPU staging buffer of a batch, larger batches go in chunks.
DEFAULT_STAGING_BYTES = 256 << 20
# pipelined: size of each of the rotating staging buffers.
DEFAULT_CHUNK_BYTES = 32 << 20
DEFAULT_NUM_BUFFERS = 2
# block-major pipelined: chunks of a large batch grow up to this many times chunk_bytes
GROW_CHUNKS = 4
# auto: below this many bytes per PCIe copy (a run of CPU ids: every layer of a block-major
# pool, one layer of a layer-major one) the copy engine's per-copy cost shows; go direct.
DEFAULT_MIN_COPY_BYTES = 256 << 10


def pick_strategy(
    plan: CopyPlan,
    *,
    layers: int,
    block_layer_bytes: int,
    block_major: bool,
    have_direct: bool,
    min_copy_bytes: int,
) -> str:
    """``auto``'s choice for one batch: ``pipelined`` unless its PCIe copies (one per run of
    CPU ids, times ``layers`` in a layer-major pool) would average under ``min_copy_bytes``,
    then ``direct`` (one kernel, no per-copy cost) where the direct copier exists."""
    if not have_direct or not plan.runs:
        return "pipelined"
    copies = len(plan.runs) * (1 if block_major else layers)
    nbytes = len(plan.keyed) * layers * block_layer_bytes
    return "direct" if nbytes < copies * min_copy_bytes else "pipelined"


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

    def order_before_current(self) -> None:
        torch.cuda.current_stream(self._event.device).wait_event(self._event)


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
    - pipelined: chunks of ``chunk_bytes`` (block-major: up to ``GROW_CHUNKS`` times that for
      large batches) through ``num_buffers`` rotating buffers; the
      gather (load: the scatter) runs on the direction's stream and the PCIe copies on a
      second one, so consecutive chunks overlap. A block-major pool (``block_major=True``)
      is staged block-major (``blockwise``: one gather kernel per chunk, one copy per run of
      CPU ids, all layers at once); a layer-major one layer by layer (``staged``).
    - direct: one Triton kernel per batch reads or writes the pinned pool through mapped
      memory, no staging (``triton_copier``).
    - auto (the default): per batch, ``direct`` when its PCIe copies would average under
      ``min_copy_bytes`` (short runs of CPU ids in a layer-major pool), else ``pipelined``.
    Stores and loads have their own pair of streams, so a step's stores and loads overlap on
    the two copy engines.
    """

    def __init__(
        self,
        gpu_layers: Sequence[torch.Tensor],
        cpu_layers: Sequence[torch.Tensor],
        copy_strategy: str | None = None,
        staging_bytes: int = DEFAULT_STAGING_BYTES,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        num_buffers: int = DEFAULT_NUM_BUFFERS,
        min_copy_bytes: int = DEFAULT_MIN_COPY_BYTES,
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
        self.block_layer_bytes = first[0].numel() * first.element_size()
        block_bytes = self.block_layer_bytes * len(self.gpu_layers)
        self.chunk_blocks = max(1, staging_bytes // block_bytes)
        self.chunk_rows = max(1, chunk_bytes // self.block_layer_bytes)
        self.pipe_blocks = max(1, chunk_bytes // block_bytes)
        self.num_buffers = num_buffers
        self.min_copy_bytes = min_copy_bytes
        self.gpu_rows = [wide_rows(t) for t in self.gpu_layers]
        self.cpu_rows = [wide_rows(t) for t in self.cpu_layers]
        # block-major pool: [num_cpu_blocks, layers * row] (None: layer-major)
        self.cpu_blocks = pool_blocks(self.cpu_layers, self.gpu_rows[0].dtype)
        self._copy_out = copier_for(self.device)
        self.store_stream = torch.cuda.Stream(device=self.device)
        self.load_stream = torch.cuda.Stream(device=self.device)
        self.store_copy_stream = torch.cuda.Stream(device=self.device)
        self.load_copy_stream = torch.cuda.Stream(device=self.device)
        self._direct: TritonCopier | None = None
        self._gather: BlockGather = TorchGather(self.gpu_rows)
        from kvbridge.copy.triton_copier import HAVE_TRITON

        if HAVE_TRITON or "direct" in self.strategy:
            from kvbridge.copy.triton_copier import TritonCopier, TritonGather

            try:
                self._direct = TritonCopier(self.gpu_layers, self.cpu_layers)
            except ValueError:
                if "direct" in self.strategy:
                    raise  # says why not; other strategies stage with torch ops instead
            if self._direct is not None:
                most = max(self.chunk_blocks, GROW_CHUNKS * self.pipe_blocks)
                self._gather = TritonGather(self._direct, most)

    @classmethod
    def allocate_cpu_layers(
        cls, gpu_layers: Sequence[torch.Tensor], num_cpu_blocks: int, *, block_major: bool = False
    ) -> list[torch.Tensor]:
        return allocate_host_pool(gpu_layers, num_cpu_blocks, block_major=block_major, pin=True)

    def choose(self, plan: CopyPlan, strategy: str) -> str:
        """The strategy a batch of ``plan`` runs with (``auto`` resolved from its shape)."""
        if strategy != "auto":
            return strategy
        return pick_strategy(
            plan,
            layers=len(self.gpu_layers),
            block_layer_bytes=self.block_layer_bytes,
            block_major=self.cpu_blocks is not None,
            have_direct=self._direct is not None,
            min_copy_bytes=self.min_copy_bytes,
        )

    def store(self, gpu_ids: Sequence[int], cpu_ids: Sequence[int]) -> CopyHandle:
        with self._ordered_on_failure():
            return _drive(self._steps(plan_runs(cpu_ids, gpu_ids), is_load=False))

    def load(self, cpu_ids: Sequence[int], gpu_ids: Sequence[int]) -> CopyHandle:
        with self._ordered_on_failure():
            return _drive(self._steps(plan_runs(cpu_ids, gpu_ids), is_load=True))

    @contextmanager
    def _ordered_on_failure(self, *streams: torch.cuda.Stream) -> Iterator[None]:
        """A batch that fails part-way (a chunk's launch or allocation raised) has chunks
        queued that still run: the caller's stream, where the recompute and the blocks' next
        users go, waits for ``streams`` (default: every copy stream) before the error goes
        on. Enter it outside any ``torch.cuda.stream`` context: inside, the "caller's" stream
        would be the copy stream itself."""
        try:
            yield
        except Exception:
            current = torch.cuda.current_stream(self.device)
            for stream in streams or (
                self.load_stream,
                self.load_copy_stream,
                self.store_stream,
                self.store_copy_stream,
            ):
                current.wait_stream(stream)
            raise

    def load_layers(
        self, cpu_ids: Sequence[int], gpu_ids: Sequence[int], chunks: Sequence[tuple[int, int]]
    ) -> list[CopyHandle]:
        """Each chunk of layers its own event: ``direct`` (one kernel per chunk) when the
        chunk's PCIe copies (one per run of CPU ids and chunk) would average under
        ``min_copy_bytes``, else staged by columns of the block-major pool through two
        rotating buffers (``layerwise_load``)."""
        plan = plan_runs(cpu_ids, gpu_ids)
        nbytes = len(plan.keyed) * len(self.gpu_layers) * self.block_layer_bytes
        strategy = self.strategy.load  # direct, or staged (serial/pipelined); auto: by shape
        direct = self._direct is not None and (
            strategy == "direct"
            or self.cpu_blocks is None
            or (strategy == "auto" and nbytes < len(plan.runs) * len(chunks) * self.min_copy_bytes)
        )
        if not plan.keyed or (self.cpu_blocks is None and not direct):
            return super().load_layers(cpu_ids, gpu_ids, chunks)
        stream = self.load_stream
        self._fence(stream)
        with self._ordered_on_failure(stream), torch.cuda.stream(stream):
            ids_host = torch.tensor([plan.other, plan.keyed], dtype=torch.int64).pin_memory()
            ids = ids_host.to(self.device, non_blocking=True)
            if direct and self._direct is not None:
                handles: list[CopyHandle] = []
                for chunk in chunks:
                    self._direct.load(ids[1], ids[0], layers=chunk)
                    handles.append(_recorded(stream, ids_host, ids))
                return handles
        assert self.cpu_blocks is not None
        copy_stream = self.load_copy_stream
        copy_stream.wait_stream(stream)
        sync = _StreamSync(copy_stream, stream, self.num_buffers)
        widest = max(hi - lo for lo, hi in chunks) * self.gpu_rows[0].shape[1]
        rows = min(len(plan.keyed), self.chunk_rows)
        with torch.cuda.stream(stream):
            buffers = self._staging(rows, count=self.num_buffers, width=widest)
        for buf in buffers:
            buf.record_stream(copy_stream)
        steps = layerwise_load(
            self.cpu_blocks, self.gpu_rows, plan, ids[0], buffers, chunks, sync, self._copy_out
        )
        with self._ordered_on_failure(stream, copy_stream):
            return [_recorded(stream, ids_host, ids, *buffers) for _ in steps]

    def store_and_load(
        self,
        store_gpu: Sequence[int],
        store_cpu: Sequence[int],
        load_cpu: Sequence[int],
        load_gpu: Sequence[int],
    ) -> tuple[CopyHandle, CopyHandle]:
        """Chunks of the store and of the load issued alternately, so both copy engines start
        at once instead of the load waiting for the whole store to be queued."""
        store = self._steps(plan_runs(store_cpu, store_gpu), is_load=False)
        load = self._steps(plan_runs(load_cpu, load_gpu), is_load=True)
        with self._ordered_on_failure():
            return _interleave(store, load)

    def shutdown(self) -> None:
        for stream in (self.store_stream, self.store_copy_stream):
            stream.synchronize()
        for stream in (self.load_stream, self.load_copy_stream):
            stream.synchronize()

    # -- helpers ------------------------------------------------------------------------------
    def _fence(self, stream: torch.cuda.Stream) -> None:
        """Order a batch after the work queued on the caller's stream: the forward that wrote
        a stored block, the last reader of a block a load overwrites (the race test removes
        this in its control and sees corrupt bytes)."""
        stream.wait_stream(torch.cuda.current_stream(self.device))

    def _steps(self, plan: CopyPlan, *, is_load: bool) -> Generator[None, None, CopyHandle]:
        """Queue one batch; yields between chunks of a block-major staged copy (no stream
        context is held across a yield); returns its handle."""
        strategy = self.choose(plan, self.strategy.load if is_load else self.strategy.store)
        stream = self.load_stream if is_load else self.store_stream
        self._fence(stream)
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
            if strategy == "serial" and self.cpu_blocks is None:
                staging = self._staging(min(len(plan.keyed), self.chunk_blocks), count=0)[0]
                copy = staged_load if is_load else staged_store
                copy(self.gpu_layers, self.cpu_layers, plan, ids[0], staging)
                return _recorded(stream, ids_host, ids, staging)
        serial = strategy == "serial"
        copy_stream = (
            stream if serial else (self.load_copy_stream if is_load else self.store_copy_stream)
        )
        copy_stream.wait_stream(stream)  # the ids, and staging memory last used on ``stream``
        count = 1 if serial else self.num_buffers
        if is_load:
            sync = _StreamSync(copy_stream, stream, count)
        else:
            sync = _StreamSync(stream, copy_stream, count)
        if self.cpu_blocks is None:
            chunks = plan_chunks(plan, len(self.gpu_layers), self.chunk_rows, count)
            with torch.cuda.stream(stream):
                buffers = self._staging(max(c.rows for c in chunks), count=min(count, len(chunks)))
            for buf in buffers:
                buf.record_stream(copy_stream)
            run = pipelined_load if is_load else pipelined_store
            run(self.gpu_rows, self.cpu_rows, plan, ids[0], buffers, chunks, sync)
            return _recorded(sync.drain_stream, ids_host, ids, *buffers)
        per_chunk = self.chunk_blocks if serial else self._pipe_blocks(len(plan.keyed))
        blocks = plan_block_chunks(plan, per_chunk, count)
        width = self.gpu_rows[0].shape[1] * len(self.gpu_rows)
        most = max(c.hi - c.lo for c in blocks)
        with torch.cuda.stream(stream):
            buffers = self._staging(most, count=min(count, len(blocks)), width=width)
        for buf in buffers:
            buf.record_stream(copy_stream)
        move = blockwise_load if is_load else blockwise_store
        yield from move(
            self._gather, self.cpu_blocks, plan, ids[0], buffers, blocks, sync, self._copy_out
        )
        return _recorded(sync.drain_stream, ids_host, ids, *buffers)

    def _pipe_blocks(self, pairs: int) -> int:
        """Blocks per pipelined chunk of a block-major batch of ``pairs``: ``chunk_bytes``,
        growing up to ``GROW_CHUNKS`` times for batches of more than 16 chunks, since each
        chunk costs ~0.1-0.2 ms of host time to queue (one H200: a gather launch, events)."""
        return max(self.pipe_blocks, min(GROW_CHUNKS * self.pipe_blocks, -(-pairs // 16)))

    def _staging(self, rows: int, *, count: int, width: int = 0) -> list[torch.Tensor]:
        """``count`` buffers of ``rows`` wide rows of ``width`` (default: one block-layer);
        ``count=0``: one ``[layers, rows, *block]``."""
        if not count:
            shape = (len(self.gpu_layers), rows, *self.block_shape)
            return [torch.empty(shape, dtype=self.gpu_layers[0].dtype, device=self.device)]
        like = self.gpu_rows[0]
        return [
            torch.empty((rows, width or like.shape[1]), dtype=like.dtype, device=self.device)
            for _ in range(count)
        ]


def _drive(steps: Generator[None, None, CopyHandle]) -> CopyHandle:
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            handle: CopyHandle = stop.value
            return handle


def _interleave(
    first: Generator[None, None, CopyHandle], second: Generator[None, None, CopyHandle]
) -> tuple[CopyHandle, CopyHandle]:
    """Advance both batches a chunk at a time, in turn, until both are queued."""
    pending = {0: first, 1: second}
    handles: dict[int, CopyHandle] = {}
    while pending:
        for key, steps in list(pending.items()):
            try:
                next(steps)
            except StopIteration as stop:
                handles[key] = stop.value
                del pending[key]
    return handles[0], handles[1]


def _recorded(stream: torch.cuda.Stream, *keep_alive: torch.Tensor) -> CopyHandle:
    event = torch.cuda.Event()
    event.record(stream)
    return _EventHandle(event, keep_alive)
