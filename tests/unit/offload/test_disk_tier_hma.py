"""The disk tier through both halves on a hybrid cache (full + sliding window), metadata and
outputs across the codec: what one scheduler/worker pair wrote, a fresh pair (a restart) reads
back through CPU blocks into other GPU blocks, each group's layers byte for byte."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from offload_helpers import BLOCK_SIZE, Driver, config, hybrid_spec, kv_caches, request
from offload_helpers import scheduled_groups as sched_groups

from kvbridge.connector.base import KVConnectorRole
from kvbridge.connector.factory import create_connector
from kvbridge.connector.types import BlockIds, KVCacheSpec
from kvbridge.offload.disk.halves import TieredOffloadScheduler, TieredOffloadWorker

BS = BLOCK_SIZE
GROUP_LAYERS = (("layers.0", "layers.2"), ("layers.1",))
TOKENS = list(range(21))  # 5 full blocks and one token
A_BLOCKS: BlockIds = ([1, 2, 3, 4, 5, 6], [0, 0, 0, 7, 8, 9])


class Pair:
    def __init__(self, spec: KVCacheSpec, root: Path, seed: int) -> None:
        cfg = config(
            num_cpu_blocks=16, kv_offload_backend="disk", disk_path=str(root),
            disk_capacity_bytes=1 << 30, n_read_threads=2, n_write_threads=2,
        )  # fmt: skip
        sched = create_connector(cfg, KVConnectorRole.SCHEDULER, spec)
        worker = create_connector(cfg, KVConnectorRole.WORKER, spec)
        assert isinstance(sched, TieredOffloadScheduler)
        assert isinstance(worker, TieredOffloadWorker)
        self.sched, self.worker = sched, worker
        self.caches = kv_caches(spec, seed=seed)
        worker.register_kv_caches(self.caches)
        self.drv = Driver(sched, worker, wire=True)

    def settle(self) -> None:
        deadline = time.monotonic() + 30
        while self.sched.disk.gauges()["kv_offload_disk_inflight_blocks"]:
            assert time.monotonic() < deadline, "disk I/O still in flight"
            self.drv.step()
            time.sleep(0.001)

    def rows(self, group: int, blocks: list[int]) -> list[torch.Tensor]:
        return [self.caches[name][blocks].clone() for name in GROUP_LAYERS[group]]


def test_hybrid_blocks_come_back_from_disk_after_a_restart(tmp_path: Path) -> None:
    spec = hybrid_spec()
    first = Pair(spec, tmp_path, seed=7)
    a = request("a", TOKENS)
    first.drv.step(sched_groups(a, A_BLOCKS, 0, 21))
    first.drv.step(sched_groups(a, A_BLOCKS, 21, 1))
    a.num_computed_tokens = 22
    assert first.sched.request_finished_all_groups(a, A_BLOCKS) == (False, None)
    first.settle()
    full, window = first.rows(0, [1, 2, 3, 4, 5]), first.rows(1, [7, 8])
    assert first.sched.disk.gauges()["kv_offload_disk_blocks"] == 5 + 2  # window: blocks 7, 8
    first.worker.shutdown()

    second = Pair(spec, tmp_path, seed=8)  # other bytes in its cache, an empty CPU tier
    b = request("b", [*TOKENS, 99])
    assert second.sched.get_num_new_matched_tokens(b, 0) == (None, False)  # reading
    second.settle()
    assert second.sched.get_num_new_matched_tokens(b, 0) == (5 * BS, True)
    blocks: BlockIds = ([10, 11, 12, 13, 14, 15], [0, 0, 0, 2, 3, 4])
    second.sched.update_state_after_alloc(b, blocks, 5 * BS)
    out = second.drv.run_until(lambda o: "b" in o.finished_recving)[-1]
    assert out.invalid_block_ids == set()
    for got, want in zip(second.rows(0, [10, 11, 12, 13, 14]), full):
        assert torch.equal(got, want)
    for got, want in zip(second.rows(1, [2, 3]), window):
        assert torch.equal(got, want)
    stats = second.sched.get_kv_connector_stats()
    assert stats is not None and stats.data["disk_hits"] == 5 + 2  # the window needs 2
    second.worker.shutdown()
