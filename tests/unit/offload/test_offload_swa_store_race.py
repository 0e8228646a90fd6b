"""A sliding-window block freed by the engine while its GPU->CPU store is in flight.

vLLM frees a sliding-window group's blocks once they leave the window (nulls them in the
table); the engine may give them to another request whose forward writes them before the
asynchronous store has read them. Such a store must never be indexed: it would publish the
other request's KV under this request's hash.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from offload_helpers import BLOCK_SIZE as BS
from offload_helpers import Driver, config, hybrid_spec, request, scheduled_groups

from kvbridge.copy.backend import CopyHandle
from kvbridge.offload.scheduler import CPUOffloadScheduler
from kvbridge.offload.worker import CPUOffloadWorker

NULL = 0  # vLLM's null block: what a block that left the window becomes in the table


class ReadsOnCompletion(CopyHandle):
    """An async store that reads its GPU source only when it completes (the late end of
    what a copy stream may do)."""

    def __init__(self, copy: Callable[[], Any]) -> None:
        self._copy: Callable[[], Any] | None = copy
        self._polls = 1

    def done(self) -> bool:
        self._polls -= 1
        if self._polls < 0 and self._copy is not None:
            self._copy()
            self._copy = None
        return self._polls < 0

    def wait(self) -> None:
        self._polls = 0
        self.done()


class LateStores:
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def store(self, gpu_ids: Sequence[int], cpu_ids: Sequence[int]) -> CopyHandle:
        return ReadsOnCompletion(lambda: self.inner.store(list(gpu_ids), list(cpu_ids)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_window_block_freed_mid_store_is_never_published() -> None:
    """Checked against the build without the check: A's sliding-window block 2 was indexed on
    the CPU tier holding B's KV (9.0 where A wrote 1.0)."""
    spec, cfg = hybrid_spec(num_blocks=32), config(num_cpu_blocks=16)
    sched, worker = CPUOffloadScheduler(cfg, spec), CPUOffloadWorker(cfg, spec)
    kv = {f"layers.{i}": torch.zeros(32, 2, BS, 2, 8) for i in range(3)}
    worker.register_kv_caches(kv)
    worker.backends[1] = LateStores(worker.backends[1])  # type: ignore[assignment]
    drv = Driver(sched, worker)

    def forward(blocks: list[int], value: float) -> Callable[[], None]:
        def run() -> None:
            for b in blocks:
                kv["layers.1"][b].fill_(value)  # layer 1: the sliding-window group's

        return run

    a = request("a", list(range(41)))
    full, window = list(range(1, 12)), list(range(12, 23))
    drv.step(scheduled_groups(a, (full, window), 0, 16), forward=forward(window[:4], 1.0))
    moved = [NULL, NULL, *window[2:]]  # blocks 0, 1 left the window
    drv.step(scheduled_groups(a, (full, moved), 16, 16), forward=forward(window[4:8], 1.0))
    stores = [(j.group, list(j.gpu_block_ids)) for j in drv.metas[-1].stores]
    assert (1, [14, 15]) in stores  # A's window blocks 2, 3: their store is in flight
    moved = [NULL] * 6 + window[6:]  # 14, 15 left the window: the engine gives them to B
    b = request("b", list(range(500, 509)))
    drv.step(
        scheduled_groups(a, (full, moved), 32, 9),
        scheduled_groups(b, ([24, 25, 26], [14, 15, 27]), 0, 9),
        forward=forward([14, 15], 9.0),
    )
    for _ in range(3):
        drv.step()
    for i in (2, 3):
        cpu = sched.pool.cached_block_id(a.block_hashes[i], 1)
        assert cpu is None or bool((worker.backends[1].inner.cpu_layers[0][cpu] == 1.0).all())
    assert sched.pool.cached_block_id(a.block_hashes[2], 0) is not None  # full group kept
    sched.check_integrity()
