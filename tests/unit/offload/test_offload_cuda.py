"""The CUDA copy backend and the worker on a GPU (skipped where CUDA is unavailable)."""

from __future__ import annotations

import time

import pytest
import torch
from offload_helpers import BLOCK_SIZE, Driver, config, request, scheduled, spec

from kvbridge.offload.copy import CopyHandle
from kvbridge.offload.cuda_copy import CUDACopyBackend
from kvbridge.offload.scheduler import CPUOffloadScheduler
from kvbridge.offload.worker import CPUOffloadWorker

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _poll(handle: CopyHandle, deadline_s: float = 10.0) -> None:
    deadline = time.monotonic() + deadline_s
    while not handle.done():
        if time.monotonic() > deadline:
            raise TimeoutError("copy did not complete")
        time.sleep(0.001)


def test_cuda_backend_round_trip_in_chunks() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    gpu = [
        torch.randn(64, 2, 16, 8, 128, device="cuda", generator=gen).to(torch.bfloat16)
        for _ in range(3)
    ]
    cpu = CUDACopyBackend.allocate_cpu_layers(gpu, 40)
    assert all(t.is_pinned() for t in cpu)
    block_bytes = gpu[0][0].numel() * gpu[0].element_size() * len(gpu)
    backend = CUDACopyBackend(gpu, cpu, staging_bytes=5 * block_bytes)  # 5-block chunks
    src = torch.randperm(64, generator=torch.Generator().manual_seed(1))[:23].tolist()
    slots = [*range(3, 20), 30, 31, 35, 36, 37, 39]
    want = [g[src].cpu() for g in gpu]
    _poll(backend.store(src, slots))
    for c, w in zip(cpu, want):
        assert torch.equal(c[slots], w)
    for g in gpu:
        g.zero_()
    targets = torch.randperm(64, generator=torch.Generator().manual_seed(2))[:23].tolist()
    _poll(backend.load(slots, targets))
    for g, w in zip(gpu, want):
        assert torch.equal(g[targets].cpu(), w)
    backend.shutdown()


def test_worker_round_trip_on_cuda() -> None:
    s = spec(num_blocks=16, num_kv_heads=8, head_dim=128, dtype="bfloat16")
    sched = CPUOffloadScheduler(config(), s)
    worker = CPUOffloadWorker(config(), s)
    shape = (s.num_blocks, 2, s.block_size, s.num_kv_heads, s.head_dim)
    caches = {
        f"layers.{i}": torch.randn(shape, device="cuda").to(torch.bfloat16)
        for i in range(s.num_layers)
    }
    worker.register_kv_caches(caches)
    assert isinstance(worker.backend, CUDACopyBackend)
    drv = Driver(sched, worker)
    a = request("a", list(range(9)))
    drv.step(scheduled(a, [3, 4, 5], 0, 9))
    drv.step(scheduled(a, [3, 4, 5], 9, 1))
    want = [t[[3, 4]].clone() for t in caches.values()]
    a.num_computed_tokens = 10
    deadline = time.monotonic() + 10
    delayed = sched.request_finished(a, [3, 4, 5]).delay_free
    while delayed and "a" not in drv.step().finished_sending:
        assert time.monotonic() < deadline
    for t in caches.values():
        t.zero_()
    b = request("b", list(range(9)))
    assert sched.get_num_new_matched_tokens(b, 0) == (2 * BLOCK_SIZE, True)
    sched.update_state_after_alloc(b, ([7, 9, 1],), 2 * BLOCK_SIZE)
    while "b" not in drv.step().finished_recving:
        assert time.monotonic() < deadline
    for t, w in zip(caches.values(), want):
        assert torch.equal(t[[7, 9]], w)
    assert sched.pool.num_pins == 0
    worker.shutdown()
