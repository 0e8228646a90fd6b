"""The block-major CPU pool and its staged copies, on CPU tensors; ``auto``'s choice."""

from __future__ import annotations

import ctypes
from collections.abc import Generator, Sequence

import pytest
import torch

from kvbridge.copy.backend import CopyHandle, CopyPlan, DoneHandle, layer_chunks, plan_runs
from kvbridge.copy.blockwise import (
    TorchGather,
    blockwise_load,
    blockwise_store,
    layerwise_load,
    plan_block_chunks,
    pool_blocks,
    run,
)
from kvbridge.copy.cpu import CPUCopyBackend
from kvbridge.copy.cuda import pick_strategy
from kvbridge.copy.dma import RawCopier, torch_copy
from kvbridge.copy.staged import InOrder, wide_rows
from kvbridge.copy.triton_copier import side

POISON = -7.0


def _cache(num_blocks: int, layers: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(num_blocks, 2, 4, 2, 8, generator=gen) for _ in range(layers)]


def test_block_major_pool_keeps_a_blocks_layers_together() -> None:
    gpu = _cache(4, layers=3, seed=0)
    cpu = CPUCopyBackend.allocate_cpu_layers(gpu, 5, block_major=True)
    block = 2 * 4 * 2 * 8  # elements of one block-layer
    assert [t.shape for t in cpu] == [torch.Size([5, 2, 4, 2, 8])] * 3
    assert [t.stride(0) for t in cpu] == [3 * block] * 3
    base = cpu[0].data_ptr()
    assert [t.data_ptr() - base for t in cpu] == [0, block * 4, 2 * block * 4]
    blocks = pool_blocks(cpu, torch.float32)
    assert blocks is not None and blocks.shape == (5, 3 * block) and blocks.is_contiguous()
    cpu[1][3].fill_(5.0)  # layer 1 of block 3 is the middle third of block 3
    assert bool((blocks[3, block : 2 * block] == 5.0).all())
    layer_major = CPUCopyBackend.allocate_cpu_layers(gpu, 5)
    assert all(t.is_contiguous() for t in layer_major)
    assert pool_blocks(layer_major, torch.float32) is None


def test_a_group_with_fewer_layers_sees_strided_blocks() -> None:
    # hybrid caches: a group of 2 layers uses the first 2 of 3 layer slots of each CPU block
    slots = CPUCopyBackend.allocate_cpu_layers(_cache(2, 3, seed=0), 4, block_major=True)
    blocks = pool_blocks(slots[:2], torch.float32)
    assert blocks is not None and blocks.shape == (4, 2 * 128) and blocks.stride() == (3 * 128, 1)
    assert pool_blocks(slots[1:], torch.float32) is not None
    assert pool_blocks([slots[0], slots[2]], torch.float32) is None  # not neighbours


def test_plan_block_chunks_rotate_buffers_and_clip_runs() -> None:
    plan = plan_runs([0, 1, 2, 3, 4, 9, 10], list(range(7)))
    chunks = plan_block_chunks(plan, chunk_blocks=3, num_buffers=2)
    assert [(c.buffer, c.lo, c.hi, c.runs) for c in chunks] == [
        (0, 0, 3, [(0, 3)]),
        (1, 3, 6, [(3, 2), (5, 1)]),
        (0, 6, 7, [(6, 1)]),
    ]
    with pytest.raises(ValueError, match="chunk_blocks and num_buffers must be >= 1"):
        plan_block_chunks(plan, 3, 0)
    assert plan_block_chunks(plan_runs([], []), 3, 2) == []


def _round_trip(num_slots: int, layers: int) -> None:
    gpu = _cache(16, layers=layers, seed=3)
    slots = CPUCopyBackend.allocate_cpu_layers(_cache(1, num_slots, 0), 12, block_major=True)
    for s in slots:
        s.fill_(POISON)
    cpu = slots[:layers]
    gpu_rows = [wide_rows(t) for t in gpu]
    blocks = pool_blocks(cpu, gpu_rows[0].dtype)
    assert blocks is not None
    src, dst = [15, 2, 7, 3, 11, 0, 9], [8, 0, 1, 2, 5, 6, 11]  # runs 0-2, 5-6, 8, 11
    plan = plan_runs(dst, src)
    chunks = plan_block_chunks(plan, chunk_blocks=3, num_buffers=2)
    copies: list[int] = []

    def counting(
        dst: torch.Tensor, src: torch.Tensor, runs: Sequence[tuple[int, int, int]]
    ) -> None:
        copies.extend(rows for _, _, rows in runs)
        torch_copy(dst, src, runs)

    buffers = [torch.full((3, blocks.shape[1]), -1, dtype=blocks.dtype) for _ in range(2)]
    gather, index = TorchGather(gpu_rows), torch.tensor(plan.other)
    run(blockwise_store(gather, blocks, plan, index, buffers, chunks, InOrder(), counting))
    assert copies == [3, 2, 1, 1]  # one copy per run of CPU ids (clipped to chunks), all layers
    for g, c in zip(gpu, cpu):
        assert all(torch.equal(c[d], g[s]) for s, d in zip(src, dst))
        assert bool((c[[b for b in range(12) if b not in dst]] == POISON).all())
    assert all(bool((s == POISON).all()) for s in slots[layers:])  # other slots untouched
    original = [g.clone() for g in gpu]
    for g in gpu:
        g.fill_(POISON)
    targets = [1, 4, 5, 6, 8, 10, 12]
    back = plan_runs(dst, targets)
    chunks = plan_block_chunks(back, chunk_blocks=2, num_buffers=2)
    index = torch.tensor(back.other)
    run(blockwise_load(gather, blocks, back, index, buffers, chunks, InOrder(), torch_copy))
    for g, o in zip(gpu, original):
        assert all(torch.equal(g[t], o[s]) for s, t in zip(src, targets))
        assert bool((g[[b for b in range(16) if b not in targets]] == POISON).all())


def test_blockwise_round_trip_with_one_copy_per_run() -> None:
    _round_trip(num_slots=3, layers=3)


def test_blockwise_round_trip_of_a_group_with_fewer_layers_than_slots() -> None:
    _round_trip(num_slots=4, layers=2)


def test_cpu_backend_round_trips_through_a_block_major_pool() -> None:
    gpu = _cache(12, layers=3, seed=1)
    cpu = CPUCopyBackend.allocate_cpu_layers(gpu, 6, block_major=True)
    backend = CPUCopyBackend(gpu, cpu)
    src, dst, targets = [9, 2, 3, 11, 0], [4, 0, 1, 5, 2], [7, 8, 1, 10, 6]
    backend.store(src, dst).wait()
    original = [g.clone() for g in gpu]
    backend.load(dst, targets).wait()
    for g, c, o in zip(gpu, cpu, original):
        assert all(torch.equal(c[d], o[s]) for s, d in zip(src, dst))
        assert all(torch.equal(g[t], o[s]) for s, t in zip(src, targets))


def test_direct_kernel_addresses_a_block_major_pool_with_its_stride() -> None:
    pool = torch.zeros(10, 3, 64, dtype=torch.bfloat16)  # 128 bytes per block-layer
    where = side(list(pool.unbind(1)), "CPU pool")
    assert where.layer_vecs == [0, 8, 16] and where.stride == 3 * 128 // 8
    layer_major = side(list(torch.zeros(3, 10, 64, dtype=torch.bfloat16).unbind(0)), "CPU pool")
    assert layer_major.layer_vecs == [0, 80, 160] and layer_major.stride == 128 // 8
    flat = torch.zeros(1000, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="CPU pool layer 1 must keep a block contiguous"):
        side([flat[0:640].view(10, 64), flat[3:643].view(10, 64)], "CPU pool")


def _plan(cpu_ids: list[int]) -> CopyPlan:
    return plan_runs(cpu_ids, list(range(len(cpu_ids))))


@pytest.mark.parametrize(
    ("cpu_ids", "block_major", "kib", "want"),
    [
        (list(range(0, 512, 2)), True, 16, "pipelined"),  # 32 layers x 16 KiB = 512 KiB a copy
        (list(range(0, 512, 2)), False, 64, "direct"),  # one 64 KiB copy per layer and block
        (list(range(256)), False, 16, "pipelined"),  # one run: 4 MiB per layer
        (list(range(0, 512, 2)), True, 4, "direct"),  # 128 KiB per block
    ],
)
def test_auto_picks_direct_only_where_copies_would_be_small(
    cpu_ids: list[int], block_major: bool, kib: int, want: str
) -> None:
    for have_direct in (True, False):
        got = pick_strategy(
            _plan(cpu_ids),
            layers=32,
            block_layer_bytes=kib << 10,
            block_major=block_major,
            have_direct=have_direct,
            min_copy_bytes=256 << 10,
        )
        assert got == (want if have_direct else "pipelined")


def test_interleave_alternates_two_batches_chunk_by_chunk() -> None:
    from kvbridge.copy.cuda import _drive, _interleave

    log: list[str] = []

    def batch(name: str, chunks: int) -> Generator[None, None, CopyHandle]:
        for i in range(chunks):
            log.append(f"{name}{i}")
            yield
        return DoneHandle()

    first, second = _interleave(batch("s", 3), batch("l", 1))
    assert log == ["s0", "l0", "s1", "s2"] and first.done() and second.done()
    log.clear()
    assert _drive(batch("s", 2)).done() and log == ["s0", "s1"]


def test_raw_copier_addresses_strided_rows_and_refuses_runs_outside() -> None:
    # the runtime call replaced by a memmove per row: checks the addresses and pitches it gets
    calls: list[tuple[int, int]] = []

    def memcpy2d(
        dst: int, dpitch: int, src: int, spitch: int, width: int, rows: int, kind: int, _: int
    ) -> int:
        assert kind == 4  # cudaMemcpyDefault
        calls.append((width, rows))
        for i in range(rows):
            ctypes.memmove(dst + i * dpitch, src + i * spitch, width)
        return 0

    copier = RawCopier.__new__(RawCopier)
    copier._fn = memcpy2d  # type: ignore[assignment]
    copier._stream = lambda: 0
    pool = torch.zeros(6, 3, 8, dtype=torch.int64)  # 6 blocks of 3 layer slots
    blocks = pool_blocks(list(pool.unbind(1))[:2], torch.int64)  # a 2-layer group: strided
    assert blocks is not None and blocks.stride() == (24, 1)
    staged = torch.arange(4 * 16, dtype=torch.int64).view(4, 16)
    copier(blocks, staged, [(1, 0, 2), (4, 2, 1)])
    assert calls == [(128, 2), (128, 1)]
    assert torch.equal(blocks[1:3], staged[0:2]) and torch.equal(blocks[4], staged[2])
    assert bool((pool[:, 2] == 0).all()) and bool((pool[[0, 3, 5]] == 0).all())
    for bad in ([(5, 0, 2)], [(0, 3, 2)], [(0, 0, 0)]):
        with pytest.raises(ValueError, match="outside"):
            copier(blocks, staged, bad)


def test_layer_chunks_hold_at_least_the_minimum_bytes() -> None:
    assert layer_chunks(5, layer_bytes=10, min_chunk_bytes=25) == [(0, 4), (4, 5)]
    eights = [(0, 8), (8, 16), (16, 24), (24, 32)]
    assert layer_chunks(32, layer_bytes=10, min_chunk_bytes=50) == eights
    assert layer_chunks(3, layer_bytes=10, min_chunk_bytes=1000) == [(0, 3)]
    assert layer_chunks(3, layer_bytes=100, min_chunk_bytes=8) == [(0, 1), (1, 2), (2, 3)]
    assert layer_chunks(2, layer_bytes=0, min_chunk_bytes=8) == [(0, 2)]
    with pytest.raises(ValueError, match="num_layers must be >= 1"):
        layer_chunks(0, 1, 1)


def test_layerwise_load_puts_each_chunk_in_place_before_it_yields() -> None:
    # Four layers in chunks (0,1) (1,3) (3,4); buffers of 3 pairs, so each chunk goes in
    # slices; after chunk c is yielded its layers hold the loaded blocks, later ones do not.
    layers = 4
    gpu = _cache(16, layers=layers, seed=5)
    cpu = CPUCopyBackend.allocate_cpu_layers(gpu, 12, block_major=True)
    stored = [g.clone() for g in gpu]
    src, slots = [15, 2, 7, 3, 11, 0, 9], [8, 0, 1, 2, 5, 6, 11]
    CPUCopyBackend(gpu, cpu).store(src, slots).wait()
    for g in gpu:
        g.fill_(POISON)
    gpu_rows = [wide_rows(t) for t in gpu]
    blocks = pool_blocks(cpu, gpu_rows[0].dtype)
    assert blocks is not None
    targets = [1, 4, 5, 6, 8, 10, 12]
    plan = plan_runs(slots, targets)
    width = 2 * gpu_rows[0].shape[1]
    buffers = [torch.full((3, width), -1, dtype=blocks.dtype) for _ in range(2)]
    chunks = [(0, 1), (1, 3), (3, 4)]
    copies: list[int] = []

    def counting(
        dst: torch.Tensor, src: torch.Tensor, runs: Sequence[tuple[int, int, int]]
    ) -> None:
        copies.append(len(runs))
        torch_copy(dst, src, runs)

    index = torch.tensor(plan.other)
    steps = layerwise_load(blocks, gpu_rows, plan, index, buffers, chunks, InOrder(), counting)
    for c, (_lo, hi) in zip(steps, chunks, strict=True):
        for layer in range(layers):
            loaded = all(torch.equal(gpu[layer][t], stored[layer][s]) for s, t in zip(src, targets))
            assert loaded == (layer < hi), (c, layer)
    assert len(copies) == 3 * 3  # three slices of 3, 3 and 1 pairs per chunk
    kept = [b for b in range(16) if b not in targets]
    assert all(bool((g[kept] == POISON).all()) for g in gpu)


def test_default_load_layers_shares_one_handle() -> None:
    gpu = _cache(4, layers=2, seed=0)
    cpu = CPUCopyBackend.allocate_cpu_layers(gpu, 4, block_major=True)
    backend = CPUCopyBackend(gpu, cpu)
    backend.store([0, 1], [2, 3]).wait()
    handles = backend.load_layers([2, 3], [3, 2], [(0, 1), (1, 2)])
    assert len(handles) == 2 and handles[0] is handles[1]
    handles[0].order_before_current()
    assert torch.equal(gpu[1][3], gpu[1][0]) and torch.equal(gpu[0][2], gpu[0][1])
