"""The CUDA copy backend: its device-agnostic planning on CPU, its strategies on a GPU.

Tests marked ``needs_cuda`` are skipped where CUDA is unavailable; the direct strategy is also
skipped without Triton.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbridge.bench.offload import main as bench_main
from kvbridge.copy.backend import CopyHandle, CopyStrategy, parse_strategy, plan_runs
from kvbridge.copy.blockwise import TorchGather
from kvbridge.copy.cuda import CUDACopyBackend
from kvbridge.copy.dma import RawCopier
from kvbridge.copy.staged import (
    InOrder,
    StagedChunk,
    pipelined_load,
    pipelined_store,
    plan_chunks,
    wide_rows,
)
from kvbridge.copy.triton_copier import HAVE_TRITON, TileShape, tile_shape, vec_offsets

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
POISON = -7.0


# -- planning and sequencing, on CPU ------------------------------------------------------------
def test_parse_strategy_accepts_one_name_or_a_pair() -> None:
    assert parse_strategy("pipelined") == CopyStrategy("pipelined", "pipelined")
    assert parse_strategy("direct/serial") == CopyStrategy("direct", "serial")
    for bad in ("fast", "", "direct/", "serial/pipelined/direct"):
        with pytest.raises(ValueError, match="copy_strategy"):
            parse_strategy(bad)


def test_backend_validates_strategy_and_device() -> None:
    gpu = [torch.zeros(4, 2, 8)]
    cpu = [torch.zeros(4, 2, 8)]
    with pytest.raises(ValueError, match="copy_strategy: 'fast'"):
        CUDACopyBackend(gpu, cpu, copy_strategy="fast")
    with pytest.raises(ValueError, match="not CUDA"):
        CUDACopyBackend(gpu, cpu, copy_strategy="pipelined")


def test_plan_chunks_packs_layers_in_order_and_rotates_buffers() -> None:
    plan = plan_runs([0, 1, 2], [5, 6, 7])  # one run of 3 CPU ids
    chunks = plan_chunks(plan, num_layers=3, chunk_rows=4, num_buffers=2)
    layout = [
        (c.buffer, c.rows, [(s.layer, s.lo, s.hi, s.row, s.runs) for s in c.segments])
        for c in chunks
    ]
    assert layout == [
        (0, 4, [(0, 0, 3, 0, [(0, 3)]), (1, 0, 1, 3, [(0, 1)])]),
        (1, 4, [(1, 1, 3, 0, [(1, 2)]), (2, 0, 2, 2, [(0, 2)])]),
        (0, 1, [(2, 2, 3, 0, [(2, 1)])]),
    ]
    assert plan_chunks(plan_runs([], []), 3, 4, 2) == []
    with pytest.raises(ValueError, match="chunk_rows and num_buffers must be >= 1"):
        plan_chunks(plan, 3, 0, 2)


@settings(max_examples=60, deadline=None)
@given(
    cpu_ids=st.lists(st.integers(0, 40), unique=True, max_size=25),
    num_layers=st.integers(1, 4),
    chunk_rows=st.integers(1, 12),
    num_buffers=st.integers(1, 3),
)
def test_plan_chunks_covers_each_layer_pair_once_within_capacity(
    cpu_ids: list[int], num_layers: int, chunk_rows: int, num_buffers: int
) -> None:
    plan = plan_runs(cpu_ids, list(range(len(cpu_ids))))
    chunks = plan_chunks(plan, num_layers, chunk_rows, num_buffers)
    seen: list[tuple[int, int]] = []
    for i, chunk in enumerate(chunks):
        assert chunk.buffer == i % num_buffers
        assert chunk.rows <= chunk_rows and (chunk.rows == chunk_rows or i == len(chunks) - 1)
        row = 0
        for seg in chunk.segments:
            assert seg.row == row and seg.lo < seg.hi
            row += seg.hi - seg.lo
            seen += [(seg.layer, p) for p in range(seg.lo, seg.hi)]
            # the runs tile lo:hi, and each is consecutive in CPU ids
            assert [p for off, n in seg.runs for p in range(off, off + n)] == list(
                range(seg.lo, seg.hi)
            )
            for off, n in seg.runs:
                assert plan.keyed[off : off + n] == list(
                    range(plan.keyed[off], plan.keyed[off] + n)
                )
        assert row == chunk.rows
    assert seen == [(layer, p) for layer in range(num_layers) for p in range(len(cpu_ids))]


class _CheckedSync:
    """In-order sync that asserts each buffer goes free -> filled -> drained -> free."""

    def __init__(self) -> None:
        self.state: dict[int, str] = {}
        self.log: list[tuple[str, int]] = []

    @contextmanager
    def fill(self, buffer: int) -> Iterator[None]:
        assert self.state.get(buffer, "free") == "free"
        self.state[buffer] = "filling"
        yield
        self.state[buffer] = "full"
        self.log.append(("fill", buffer))

    @contextmanager
    def drain(self, buffer: int) -> Iterator[None]:
        assert self.state[buffer] == "full"
        self.state[buffer] = "draining"
        yield
        self.state[buffer] = "free"
        self.log.append(("drain", buffer))


def _layers(num_blocks: int, seed: int, layers: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(num_blocks, 2, 4, 2, 8, generator=gen) for _ in range(layers)]


def _buffers(chunks: list[StagedChunk], like: torch.Tensor, count: int) -> list[torch.Tensor]:
    rows = max(c.rows for c in chunks)
    return [torch.full((rows, like.shape[1]), -1, dtype=like.dtype) for _ in range(count)]


def test_pipelined_sequences_round_trip_on_cpu() -> None:
    gpu = _layers(16, seed=3)
    pool = torch.full((3, 12, *gpu[0].shape[1:]), POISON)
    cpu = list(pool.unbind(0))
    gpu_rows, cpu_rows = [wide_rows(t) for t in gpu], [wide_rows(t) for t in cpu]
    src, slots = [15, 2, 7, 3, 11, 0, 9], [8, 0, 1, 2, 5, 6, 11]
    plan = plan_runs(slots, src)
    chunks = plan_chunks(plan, len(gpu), chunk_rows=4, num_buffers=2)
    assert len(chunks) == 6  # 21 layer-pairs in chunks of 4: several rotations of 2 buffers
    sync = _CheckedSync()
    buffers = _buffers(chunks, gpu_rows[0], 2)
    pipelined_store(gpu_rows, cpu_rows, plan, torch.tensor(plan.other), buffers, chunks, sync)
    assert sync.log == [(step, c % 2) for c in range(6) for step in ("fill", "drain")]
    for g, c in zip(gpu, cpu):
        assert all(torch.equal(c[d], g[s]) for s, d in zip(src, slots))
        free = [b for b in range(12) if b not in slots]
        assert bool((c[free] == POISON).all())
    original = [g.clone() for g in gpu]
    for g in gpu:
        g.fill_(POISON)
    targets = [1, 4, 5, 6, 8, 10, 12]
    back = plan_runs(slots, targets)
    chunks = plan_chunks(back, len(gpu), chunk_rows=5, num_buffers=3)
    buffers = _buffers(chunks, gpu_rows[0], 3)
    pipelined_load(gpu_rows, cpu_rows, back, torch.tensor(back.other), buffers, chunks, InOrder())
    for g, o in zip(gpu, original):
        assert all(torch.equal(g[t], o[s]) for s, t in zip(src, targets))
        kept = [b for b in range(16) if b not in targets]
        assert bool((g[kept] == POISON).all())


def test_pipelined_store_rejects_a_buffer_smaller_than_its_chunk() -> None:
    gpu = _layers(4, seed=5, layers=1)
    plan = plan_runs([0, 1], [2, 3])
    chunks = plan_chunks(plan, 1, chunk_rows=2, num_buffers=1)
    rows = [wide_rows(t) for t in gpu]
    small = [torch.empty(1, rows[0].shape[1], dtype=rows[0].dtype)]
    with pytest.raises(ValueError, match="chunk of 2 rows, buffer of 1"):
        pipelined_store(rows, rows, plan, torch.tensor([2, 3]), small, chunks, InOrder())


def test_wide_rows_views_the_same_bytes_in_the_widest_dtype() -> None:
    blocks = torch.randn(5, 2, 16, 8, 128).to(torch.bfloat16)
    rows = wide_rows(blocks)
    assert rows.dtype == torch.int64 and rows.shape == (5, 8192)
    assert rows.data_ptr() == blocks.data_ptr()
    assert wide_rows(torch.zeros(4, 3, dtype=torch.bfloat16)).dtype == torch.int16


def test_tile_shape_and_layer_offsets_for_the_direct_kernel() -> None:
    assert tile_shape(8192) == TileShape(2048, 4, True)  # a 64 KiB block row
    assert tile_shape(3000) == TileShape(2048, 2, False)
    assert tile_shape(100) == TileShape(128, 1, False)
    with pytest.raises(ValueError, match="row must be >= 1"):
        tile_shape(0)
    pool = torch.zeros(3, 10, 64, dtype=torch.bfloat16)  # 1280 bytes per layer
    assert vec_offsets(list(pool.unbind(0)), "CPU pool") == [0, 80, 160]


@pytest.mark.skipif(HAVE_TRITON, reason="checks the message shown without triton")
def test_direct_strategy_without_triton_is_refused() -> None:
    from kvbridge.copy.triton_copier import TritonCopier

    with pytest.raises(ValueError, match="needs triton"):
        TritonCopier([torch.zeros(2, 8)], [torch.zeros(2, 8)])


def test_bench_refuses_strategies_on_cpu_and_takes_several_sizes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        bench_main(["--device", "cpu", "--strategy", "direct"])
    args = ["--device", "cpu", "--layers", "1", "--blocks", "4", "8", "--iters", "1"]
    assert bench_main([*args, "--kib", "16", "64", "--cpu-ids", "scattered"]) == 0
    out = capsys.readouterr().out
    # 2 sizes x 2 block-layer sizes x 3 directions, scattered ids only
    assert out.count("PASS") == 12 and len(re.findall(r"│\s*8\s*│ scattered", out)) == 6


# -- on a GPU ---------------------------------------------------------------------------------
def _poll(handle: CopyHandle, deadline_s: float = 10.0) -> None:
    deadline = time.monotonic() + deadline_s
    while not handle.done():
        if time.monotonic() > deadline:
            raise TimeoutError("copy did not complete")
        time.sleep(0.001)


def _cuda_layers(num_blocks: int, layers: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (num_blocks, 2, 16, 8, 128)
    return [
        torch.randn(shape, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(layers)
    ]


STRATEGIES = ["auto", "serial", "pipelined", "direct", "direct/pipelined", "pipelined/direct"]


@needs_cuda
@pytest.mark.parametrize("block_major", [True, False], ids=["block-major", "layer-major"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cuda_backend_round_trip_into_poison(strategy: str, block_major: bool) -> None:
    if "direct" in strategy and not HAVE_TRITON:
        pytest.skip("the direct strategy needs triton")
    gpu = _cuda_layers(64)
    cpu = CUDACopyBackend.allocate_cpu_layers(gpu, 40, block_major=block_major)
    assert all(t.is_pinned() for t in cpu)
    for c in cpu:
        c.fill_(POISON)
    block_layer_bytes = gpu[0][0].numel() * gpu[0].element_size()
    backend = CUDACopyBackend(
        gpu,
        cpu,
        copy_strategy=strategy,
        staging_bytes=5 * block_layer_bytes * len(gpu),  # serial: 5-block chunks
        chunk_bytes=7 * block_layer_bytes,  # pipelined: 7-row chunks, several per layer
    )
    src = torch.randperm(64, generator=torch.Generator().manual_seed(1))[:23].tolist()
    slots = [*range(3, 20), 30, 31, 35, 36, 37, 39]
    want = [g[src].cpu() for g in gpu]
    _poll(backend.store(src, slots))
    free = [b for b in range(40) if b not in slots]
    for c, w in zip(cpu, want):
        assert torch.equal(c[slots], w)
        assert bool((c[free] == POISON).all())
    for g in gpu:
        g.fill_(POISON)
    targets = torch.randperm(64, generator=torch.Generator().manual_seed(2))[:23].tolist()
    _poll(backend.load(slots, targets))
    kept = [b for b in range(64) if b not in targets]
    for g, w in zip(gpu, want):
        assert torch.equal(g[targets].cpu(), w)
        assert bool((g[kept] == POISON).all())
    empty = backend.load([], [])  # an empty batch still yields a handle
    empty.wait()
    assert empty.done()
    backend.shutdown()


@needs_cuda
@pytest.mark.parametrize("strategy", ["pipelined", "direct"])
def test_cuda_backend_batches_in_flight_together(strategy: str) -> None:
    # Two batches launched back to back, before either finished, must not share staging.
    if strategy == "direct" and not HAVE_TRITON:
        pytest.skip("the direct strategy needs triton")
    gpu = _cuda_layers(32, layers=2)
    cpu = CUDACopyBackend.allocate_cpu_layers(gpu, 16, block_major=True)
    row_bytes = gpu[0][0].numel() * gpu[0].element_size()
    backend = CUDACopyBackend(gpu, cpu, copy_strategy=strategy, chunk_bytes=3 * row_bytes)
    want = [g[:16].clone() for g in gpu]
    first, second = backend.store(range(8), range(8)), backend.store(range(8, 16), range(8, 16))
    second.wait()
    first.wait()
    for g in gpu:
        g.fill_(POISON)
    loads = [backend.load(range(8), range(16, 24)), backend.load(range(8, 16), range(24, 32))]
    for handle in loads:
        _poll(handle)
    for g, w in zip(gpu, want):
        assert torch.equal(g[16:32], w)
    backend.shutdown()


@needs_cuda
def test_bench_on_cuda_checks_every_strategy(capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "--device",
        "cuda",
        "--layers",
        "2",
        "--blocks",
        "8",
        "--iters",
        "1",
        "--chunk-mib",
        "1",
        "--kib",
        "16",
    ]
    assert bench_main([*args, "--strategy", "all"]) == 0
    out = capsys.readouterr().out
    # 2 id orders x 3 directions per strategy; direct needs triton
    assert out.count("PASS") == (24 if HAVE_TRITON else 18)


@needs_cuda
@pytest.mark.parametrize("strategy", ["pipelined", "direct", "serial"])
@pytest.mark.parametrize("gather", ["triton", "torch"])
def test_cuda_group_with_fewer_layers_than_pool_slots(strategy: str, gather: str) -> None:
    # hybrid caches: a 2-layer group uses 2 of 3 layer slots; the third slot stays untouched
    if (strategy == "direct" or gather == "triton") and not HAVE_TRITON:
        pytest.skip("needs triton")
    gpu = _cuda_layers(24, layers=2)
    slots = CUDACopyBackend.allocate_cpu_layers(_cuda_layers(1, layers=3), 20, block_major=True)
    for s in slots:
        s.fill_(POISON)
    row_bytes = gpu[0][0].numel() * gpu[0].element_size()
    backend = CUDACopyBackend(gpu, slots[:2], copy_strategy=strategy, chunk_bytes=5 * row_bytes)
    assert backend.cpu_blocks is not None and backend.cpu_blocks.stride(0) == 3 * row_bytes // 8
    assert isinstance(backend._copy_out, RawCopier)  # torch's CUDA runtime was found
    if gather == "torch":
        backend._gather = TorchGather(backend.gpu_rows)
    src, dst = [3, 17, 4, 9, 21, 0, 11], [2, 3, 4, 10, 11, 15, 19]
    want = [g[src].cpu() for g in gpu]
    backend.store(src, dst).wait()
    for c, w in zip(slots, want):
        assert torch.equal(c[dst], w)
    assert bool((slots[2] == POISON).all())
    for g in gpu:
        g.fill_(POISON)
    targets = [1, 5, 6, 7, 12, 13, 23]
    backend.load(dst, targets).wait()
    for g, w in zip(gpu, want):
        assert torch.equal(g[targets].cpu(), w)
    backend.shutdown()


@needs_cuda
@pytest.mark.parametrize("scattered", [False, True], ids=["runs", "scattered"])
def test_cuda_load_layers_orders_each_chunk_before_the_compute_stream(scattered: bool) -> None:
    # Chunks of layers load on their own events; the compute stream reads a layer right after
    # waiting on its chunk's event (no host sync), and sees the loaded blocks.
    gpu = _cuda_layers(64, layers=5)
    cpu = CUDACopyBackend.allocate_cpu_layers(gpu, 48, block_major=True)
    row_bytes = gpu[0][0].numel() * gpu[0].element_size()
    backend = CUDACopyBackend(gpu, cpu, chunk_bytes=6 * row_bytes)  # slices of 6 pairs
    gen = torch.Generator().manual_seed(3)
    src = torch.randperm(64, generator=gen)[:20].tolist()
    slots = torch.randperm(48, generator=gen)[:20].tolist() if scattered else list(range(20))
    want = [g[src].clone() for g in gpu]
    _poll(backend.store(src, slots))
    for g in gpu:
        g.fill_(POISON)
    targets = torch.randperm(64, generator=gen)[:20].tolist()
    chunks = [(0, 2), (2, 3), (3, 5)]
    handles = backend.load_layers(slots, targets, chunks)
    assert len(handles) == 3
    seen = []
    for (lo, hi), handle in zip(chunks, handles, strict=True):
        handle.order_before_current()
        seen += [gpu[layer][targets].clone() for layer in range(lo, hi)]
    for got, w in zip(seen, want, strict=True):
        assert torch.equal(got, w)
    backend.shutdown()
