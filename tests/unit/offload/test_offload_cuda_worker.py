"""The CPU tier's worker on CUDA caches: stores and loads through each copy strategy.

Skipped where CUDA is unavailable; the direct strategy is also skipped without Triton.
"""

from __future__ import annotations

import time

import pytest
import torch

from kvbridge.copy.cuda import CUDACopyBackend
from kvbridge.copy.triton_copier import HAVE_TRITON

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_worker_round_trip_on_cuda() -> None:
    # Imported here: a GPU host may lack msgspec, which the other tests in this file do not need.
    pytest.importorskip("msgspec")
    from offload_helpers import BLOCK_SIZE, Driver, config, request, scheduled, spec

    from kvbridge.offload.scheduler import CPUOffloadScheduler
    from kvbridge.offload.worker import CPUOffloadWorker

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


@needs_cuda
@pytest.mark.parametrize("strategy", ["serial", "pipelined", "direct"])
@pytest.mark.parametrize("aliased", [False, True])
def test_hybrid_worker_round_trip_on_cuda(strategy: str, aliased: bool) -> None:
    # Full group: layers 0 and 2; window group: layer 1. ``aliased``: layer 1 shares layer 0's
    # memory, as vLLM's groups share KV tensors (a block id belongs to one group at a time).
    pytest.importorskip("msgspec")
    if strategy == "direct" and not HAVE_TRITON:
        pytest.skip("needs triton")
    from offload_helpers import BLOCK_SIZE, Driver, config, hybrid_spec, request, scheduled_groups

    from kvbridge.offload.scheduler import CPUOffloadScheduler
    from kvbridge.offload.worker import CPUOffloadWorker

    s = hybrid_spec()
    cfg = config(num_cpu_blocks=16, copy_strategy=strategy)
    sched, worker = CPUOffloadScheduler(cfg, s), CPUOffloadWorker(cfg, s)
    shape = (s.num_blocks, 2, s.block_size, s.num_kv_heads, s.head_dim)
    caches = {f"layers.{i}": torch.randn(shape, device="cuda") for i in range(3)}
    if aliased:
        caches["layers.1"] = caches["layers.0"]
    worker.register_kv_caches(caches)
    assert len(worker.backends) == 2
    drv = Driver(sched, worker)
    a = request("a", list(range(21)))
    a_blocks = ([1, 2, 3, 4, 5, 6], [0, 0, 0, 7, 8, 9])
    drv.step(scheduled_groups(a, a_blocks, 0, 21))
    drv.step(scheduled_groups(a, a_blocks, 21, 1))
    want = [caches[n][[1, 2, 3, 4, 5]].clone() for n in ("layers.0", "layers.2")]
    window = caches["layers.1"][[7, 8]].clone()
    a.num_computed_tokens = 22
    deadline = time.monotonic() + 10
    delayed = sched.request_finished_all_groups(a, a_blocks).delay_free
    while delayed and "a" not in drv.step().finished_sending:
        assert time.monotonic() < deadline
    for t in caches.values():
        t.zero_()
    b = request("b", list(range(21)))
    assert sched.get_num_new_matched_tokens(b, 0) == (5 * BLOCK_SIZE, True)
    b_blocks = ([10, 11, 12, 13, 14, 15], [0, 0, 0, 2, 3, 4])
    sched.update_state_after_alloc(b, b_blocks, 5 * BLOCK_SIZE)
    while "b" not in drv.step().finished_recving:
        assert time.monotonic() < deadline
    for name, w in zip(("layers.0", "layers.2"), want):
        assert torch.equal(caches[name][[10, 11, 12, 13, 14]], w)
    assert torch.equal(caches["layers.1"][[2, 3]], window)
    assert not caches["layers.2"][[0, 2, 3]].any()  # the window load wrote layer 1 only
    assert sched.pool.num_pins == 0
    sched.check_integrity()
    worker.shutdown()
