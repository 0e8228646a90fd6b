"""A hybrid cache through both halves and the real CPU copy engine: bytes per layer per block.

Group 0 (full attention) owns layers 0 and 2, group 1 (sliding window, 2 blocks read before a
hit's end) owns layer 1. As in vLLM, all groups draw block ids from one GPU pool, and the
sliding-window table holds the null block 0 where blocks left the window.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from offload_helpers import (
    BLOCK_SIZE,
    Driver,
    Later,
    config,
    hybrid_spec,
    kv_caches,
    request,
    scheduled_groups,
)

from kvbridge.config import ConfigError
from kvbridge.connector.base import KVConnectorRole
from kvbridge.connector.factory import create_connector
from kvbridge.connector.types import BlockIds, SimpleRequest
from kvbridge.copy.backend import CopyHandle
from kvbridge.copy.cpu import CPUCopyBackend
from kvbridge.offload.scheduler import CPUOffloadScheduler
from kvbridge.offload.worker import CPUOffloadWorker

BS = BLOCK_SIZE
GROUP_LAYERS = (("layers.0", "layers.2"), ("layers.1",))
TOKENS = list(range(21))  # 5 full blocks and one token
# Prefilled in one step: the window group already nulled the blocks that left the window.
A_BLOCKS: BlockIds = ([1, 2, 3, 4, 5, 6], [0, 0, 0, 7, 8, 9])


class Hybrid:
    def __init__(self, num_cpu_blocks: int = 16) -> None:
        self.spec = hybrid_spec()
        cfg = config(num_cpu_blocks=num_cpu_blocks)
        sched = create_connector(cfg, KVConnectorRole.SCHEDULER, self.spec)
        worker = create_connector(cfg, KVConnectorRole.WORKER, self.spec)
        assert isinstance(sched, CPUOffloadScheduler) and isinstance(worker, CPUOffloadWorker)
        self.sched, self.worker = sched, worker
        self.caches = kv_caches(self.spec, seed=7)
        self.worker.register_kv_caches(self.caches)
        self.drv = Driver(self.sched, self.worker)

    def rows(self, group: int, blocks: Sequence[int]) -> list[torch.Tensor]:
        return [self.caches[name][list(blocks)].clone() for name in GROUP_LAYERS[group]]

    def all_rows(self) -> dict[str, torch.Tensor]:
        return {name: t.clone() for name, t in self.caches.items()}

    def store(self, req: SimpleRequest, blocks: BlockIds) -> None:
        """Prefill in one step, then one decode step: the confirmed full blocks are stored."""
        n = req.num_prompt_tokens
        self.drv.step(scheduled_groups(req, blocks, 0, n))
        self.drv.step(scheduled_groups(req, blocks, n, 1))
        req.num_computed_tokens = n + 1
        assert self.sched.request_finished_all_groups(req, blocks) == (False, None)

    def scramble(self) -> None:
        for t in self.caches.values():
            t.normal_()


def test_hybrid_store_evict_load_into_other_blocks_gives_back_the_bytes() -> None:
    h = Hybrid()
    h.store(request("a", TOKENS), A_BLOCKS)
    full_before, window_before = h.rows(0, [1, 2, 3, 4, 5]), h.rows(1, [7, 8])
    h.scramble()  # the GPU blocks are evicted and reused
    b = request("b", [*TOKENS, 99])
    assert h.sched.get_num_new_matched_tokens(b, 0) == (5 * BS, True)
    # Other ids; the window group reuses ids 2 and 3 that group 0 held before.
    h.sched.update_state_after_alloc(b, ([10, 11, 12, 13, 14, 15], [0, 0, 0, 2, 3, 4]), 5 * BS)
    before = h.all_rows()
    out = h.drv.step()
    assert out.finished_recving == {"b"} and out.invalid_block_ids == set()
    for got, want in zip(h.rows(0, [10, 11, 12, 13, 14]), full_before):
        assert torch.equal(got, want)
    for got, want in zip(h.rows(1, [2, 3]), window_before):
        assert torch.equal(got, want)
    # Nothing else moved: the null block, other blocks, and each group's rows in the other
    # group's target blocks (layers 0 and 2 at blocks 2, 3; layer 1 at blocks 10..14).
    written = {name: set() for name in h.caches}
    for name in GROUP_LAYERS[0]:
        written[name] = {10, 11, 12, 13, 14}
    written["layers.1"] = {2, 3}
    for name, t in h.caches.items():
        for block in range(h.spec.num_blocks):
            if block not in written[name]:
                assert torch.equal(t[block], before[name][block]), (name, block)


def test_each_groups_load_writes_only_its_own_layers() -> None:
    h = Hybrid()
    h.store(request("a", TOKENS), A_BLOCKS)
    window = h.rows(1, [8])[0]  # block 4 of the window group
    h.scramble()
    before = h.all_rows()
    b = request("b", TOKENS)
    # The engine's own prefix covers blocks 0..3: one block per group comes from the CPU.
    assert h.sched.get_num_new_matched_tokens(b, 4 * BS) == (BS, True)
    h.sched.update_state_after_alloc(b, ([1, 2, 3, 4, 5, 6], [0, 0, 0, 11, 12, 13]), BS)
    h.drv.step()
    loads = h.drv.metas[-1].loads
    assert [(j.group, j.gpu_block_ids) for j in loads] == [(0, [5]), (1, [12])]
    assert torch.equal(h.caches["layers.1"][12], window[0])
    for group, target in ((0, 5), (1, 12)):  # the group-1 load left layers 0 and 2 alone
        for name in GROUP_LAYERS[group]:
            t = h.caches[name]
            changed = [
                i for i in range(h.spec.num_blocks) if not torch.equal(t[i], before[name][i])
            ]
            assert changed == [target], name


class SlowLoads(CPUCopyBackend):
    def load(self, cpu_ids: Sequence[int], gpu_ids: Sequence[int]) -> CopyHandle:
        super().load(cpu_ids, gpu_ids)
        return Later(2)


def test_the_request_is_received_only_when_every_groups_load_is_done() -> None:
    h = Hybrid()
    h.store(request("a", TOKENS), A_BLOCKS)
    slow = h.worker.backends[1]
    h.worker.backends[1] = SlowLoads(slow.gpu_layers, slow.cpu_layers)
    b = request("b", TOKENS)
    h.sched.get_num_new_matched_tokens(b, 0)
    h.sched.update_state_after_alloc(b, ([10, 11, 12, 13, 14, 15], [0, 0, 0, 2, 3, 4]), 5 * BS)
    seen = [h.drv.step().finished_recving for _ in range(4)]
    assert seen == [frozenset(), frozenset(), {"b"}, frozenset()]
    assert h.sched.pool.num_pins == 0 and h.sched.num_tracked_requests == 1


def test_groups_share_cpu_memory_slot_by_slot_through_evictions() -> None:
    # 4 CPU blocks. The second request's blocks evict the first's, and each group lands in
    # CPU blocks that held the other group's rows; loads still give each group its bytes.
    h = Hybrid(num_cpu_blocks=4)
    first = request("a", list(range(100, 109)))  # 2 full blocks per group
    h.store(first, ([1, 2, 3], [4, 5, 6]))
    pool = h.sched.pool
    full_ids = [pool.cached_block_id(x, 0) for x in first.block_hashes]
    window_ids = [pool.cached_block_id(x, 1) for x in first.block_hashes]
    pool.prepare_store(first.block_hashes, 0)  # a dedup hit: group 0's blocks become MRU
    second = request("c", list(range(200, 209)))
    h.store(second, ([7, 8, 9], [10, 11, 12]))
    # evicted from each prefix's end first: in reverse order
    assert [pool.cached_block_id(x, 0) for x in second.block_hashes] == window_ids[::-1]
    assert [pool.cached_block_id(x, 1) for x in second.block_hashes] == full_ids[::-1]
    want = h.rows(0, [7, 8]), h.rows(1, [10, 11])
    h.scramble()
    again = request("d", list(range(200, 209)))
    assert h.sched.get_num_new_matched_tokens(again, 0) == (2 * BS, True)
    h.sched.update_state_after_alloc(again, ([3, 1, 2], [13, 14, 15]), 2 * BS)
    assert h.drv.step().finished_recving == {"d"}
    for got, expected in zip(h.rows(0, [3, 1]), want[0]):
        assert torch.equal(got, expected)
    for got, expected in zip(h.rows(1, [13, 14]), want[1]):
        assert torch.equal(got, expected)


def test_worker_needs_every_group_layer_and_no_stray_layer() -> None:
    s = hybrid_spec()
    caches = kv_caches(s)
    missing = {n: t for n, t in caches.items() if n != "layers.1"}
    worker = CPUOffloadWorker(config(), s)
    with pytest.raises(ConfigError, match=r"groups\[1\]\.layer_names: layer 'layers.1'"):
        worker.register_kv_caches(missing)
    stray = {**caches, "layers.9": caches["layers.0"].clone()}
    worker = CPUOffloadWorker(config(), s)
    with pytest.raises(ConfigError, match=r"kv_caches\['layers.9'\]: .* in no KV cache group"):
        worker.register_kv_caches(stray)
    worker.shutdown()
