"""The plan cache of small READs: a plan is reused only for the same ids, merge setting,
regions and layers, and a producer attached afresh (it registered again) starts an empty
cache, so no load is ever planned against another registration's geometry.

Unit tests on ``PlanCache``; then workers on one ``FakeFabric`` (READs copy real bytes), every
block of the producers' caches holding its own values, so a plan made for the wrong geometry
reads the wrong bytes and the test fails.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from nixl_helpers import config, spec, wait_for
from worker_steps import step

from kvbridge.nixl import transfers
from kvbridge.nixl.fake_fabric import FakeFabric
from kvbridge.nixl.metadata import NixlConnectorMetadata, RecvSpec, SendSpec, blocks_digest
from kvbridge.nixl.plan_cache import PlanCache, plan_key
from kvbridge.nixl.transfers import KVRegions, plan_read
from kvbridge.nixl.transport import LiveCounts
from kvbridge.nixl.worker import NixlWorker

LAYERS = [[0, 1]]


def regions(num_blocks: int = 64, base: int = 1 << 20) -> KVRegions:
    return KVRegions(("l0", "l1"), (base, base + (1 << 16)), 128, 128, num_blocks, "DRAM", 0)


LOCAL, REMOTE = regions(), regions(32, base=1 << 30)


def test_the_same_ids_reuse_the_plan_and_other_ids_or_merge_settings_do_not() -> None:
    cache = PlanCache()
    first = cache.plan(LOCAL, REMOTE, LAYERS, [[4, 5, 6]], [[7, 8, 9]], merge=True)
    assert cache.plan(LOCAL, REMOTE, LAYERS, [[4, 5, 6]], [[7, 8, 9]], merge=True) is first
    assert (cache.hits, cache.misses) == (1, 1)
    unmerged = cache.plan(LOCAL, REMOTE, LAYERS, [[4, 5, 6]], [[7, 8, 9]], merge=False)
    other = cache.plan(LOCAL, REMOTE, LAYERS, [[4, 5, 6]], [[7, 8, 10]], merge=True)
    assert unmerged is not first and other is not first and (cache.hits, cache.misses) == (1, 3)
    for plan, (loc, rem, merge) in (
        (first, ([4, 5, 6], [7, 8, 9], True)),
        (unmerged, ([4, 5, 6], [7, 8, 9], False)),
        (other, ([4, 5, 6], [7, 8, 10], True)),
    ):
        fresh = plan_read(LOCAL, REMOTE, LAYERS, [loc], [rem], merge=merge)
        assert plan.local_indices.tolist() == fresh.local_indices.tolist()
        assert plan.remote_indices.tolist() == fresh.remote_indices.tolist()
        assert plan.num_descs == fresh.num_descs


def test_other_regions_or_layers_empty_the_cache() -> None:
    """A remote whose regions object changed (another registration, even of equal values),
    other local regions or other layers per group: nothing planned before is reused."""
    cache = PlanCache()
    ids: tuple[list[list[int]], list[list[int]]] = ([[1, 2]], [[2, 3]])  # one run: merged
    first = cache.plan(LOCAL, REMOTE, LAYERS, *ids, merge=True)
    again = dataclasses.replace(REMOTE)  # equal, but another registration's
    assert cache.plan(LOCAL, again, LAYERS, *ids, merge=True) is not first
    moved = regions(32, base=1 << 31)
    plan = cache.plan(LOCAL, moved, LAYERS, *ids, merge=True)
    assert plan.remote_items[0] == (moved.base_addrs[0] + 2 * 128, 2 * 128, 0)
    bigger = regions(48, base=1 << 31)
    plan = cache.plan(LOCAL, bigger, LAYERS, *ids, merge=False)
    assert plan.remote_indices.tolist() == [2, 3, 48 + 2, 48 + 3]
    assert cache.plan(LOCAL, bigger, [[1]], *ids, merge=False) is not plan
    assert cache.plan(dataclasses.replace(LOCAL), bigger, [[1]], *ids, merge=False) is not plan
    assert cache.hits == 0 and len(cache) == 1


def test_bad_ids_are_refused_every_time_and_never_cached() -> None:
    cache = PlanCache()
    for _ in range(2):
        with pytest.raises(ValueError, match="remote block id 40 outside 0..31"):
            cache.plan(LOCAL, REMOTE, LAYERS, [[1]], [[40]], merge=True)
    assert len(cache) == 0 and cache.hits == 0


def test_the_least_recently_used_plan_goes_first() -> None:
    cache = PlanCache(max_plans=2)
    a = cache.plan(LOCAL, REMOTE, LAYERS, [[1]], [[1]], merge=True)
    cache.plan(LOCAL, REMOTE, LAYERS, [[2]], [[2]], merge=True)
    assert cache.plan(LOCAL, REMOTE, LAYERS, [[1]], [[1]], merge=True) is a  # a: recent
    cache.plan(LOCAL, REMOTE, LAYERS, [[3]], [[3]], merge=True)  # evicts [2]
    assert len(cache) == 2
    assert cache.plan(LOCAL, REMOTE, LAYERS, [[1]], [[1]], merge=True) is a
    hits = cache.hits
    cache.plan(LOCAL, REMOTE, LAYERS, [[2]], [[2]], merge=True)
    assert cache.hits == hits
    with pytest.raises(ValueError, match="max_plans"):
        PlanCache(max_plans=0)


def test_large_reads_and_arrays_are_planned_each_time() -> None:
    many = list(range(transfers.SMALL_PLAN_PAIRS + 1))
    assert plan_key([many], [many], True) is None
    assert plan_key([np.arange(3)], [[1, 2, 3]], True) is None  # type: ignore[list-item]
    assert plan_key([[1, 2]], [(3, 4)], False) == (False, ((1, 2),), ((3, 4),))
    cache = PlanCache()
    big = regions(128)
    plan = cache.plan(big, big, LAYERS, [many], [many], merge=True)
    assert len(cache) == 0 and cache.misses == 0 and plan.num_descs == 2


# -- a producer that registers again -------------------------------------------------------------
BLOCKS = [2, 3, 4]


def producer_cache(num_blocks: int, tag: float) -> dict[str, torch.Tensor]:
    """Every block of every layer holds its own value: tag + 100 * layer + block."""
    s = spec(num_blocks=num_blocks)
    shape = (s.num_blocks, 2, s.block_size, s.num_kv_heads, s.head_dim)
    out = {}
    for layer in range(s.num_layers):
        values = tag + 100 * layer + torch.arange(num_blocks, dtype=torch.float32)
        out[f"layers.{layer}"] = values.view(-1, 1, 1, 1, 1).expand(shape).contiguous()
    return out


class Pair:
    """A consumer and a producer (``num_blocks``) on one fabric; ``restart`` replaces the
    producer by a new instance of the same engine with other regions."""

    def __init__(self) -> None:
        self.fabric = FakeFabric(cycles_before_xfer_done=0)
        self.d = self._worker("kv_consumer", 16)
        self.d_cache = producer_cache(16, 0.0)
        for t in self.d_cache.values():
            t.zero_()
        self.d.register_kv_caches(self.d_cache)
        self.p_blocks, self.p_cache = 16, producer_cache(16, 1000.0)
        self.p = self._worker("kv_producer", 16)
        self.p.register_kv_caches(self.p_cache)

    def _worker(self, role: str, num_blocks: int) -> NixlWorker:
        engine = "prefill" if role == "kv_producer" else "decode"
        cfg = config(role, engine, nixl_wrapper=self.fabric.wrapper)
        return NixlWorker(cfg, spec(num_blocks=num_blocks))

    def restart(self, num_blocks: int) -> None:
        self.p.shutdown()
        assert self.p.leaked == LiveCounts(0, 0, 0, 0)
        self.p_blocks, self.p_cache = num_blocks, producer_cache(num_blocks, 5000.0)
        self.p = self._worker("kv_producer", num_blocks)
        self.p.register_kv_caches(self.p_cache)

    def load(self, rid: str) -> None:
        """Hold ``rid`` on the producer, load it into the same local blocks; check the bytes."""
        send = SendSpec(
            request_id=rid,
            num_blocks=len(BLOCKS),
            lease_duration_s=30.0,
            abort_timeout_s=60.0,
            block_ids=(BLOCKS,),
        )
        step(self.p, NixlConnectorMetadata(reqs_to_send={rid: send}), frozenset({rid}))
        recv = RecvSpec(
            request_id=f"d-{rid}",
            local_block_ids=(list(BLOCKS),),
            remote_engine_id="prefill",
            remote_host="127.0.0.1",
            remote_port=self.p.side_channel_port or 1,
            remote_block_ids=(list(BLOCKS),),
            remote_request_id=rid,
            remote_blocks_digest=blocks_digest((BLOCKS,)),
        )
        got = [step(self.d, NixlConnectorMetadata(reqs_to_recv={recv.request_id: recv}))]
        wait_for(lambda: recv.request_id in got[-1][1], poll=lambda: got.append(step(self.d)))
        assert got[-1][2] == set()
        for name, want in self.p_cache.items():
            assert torch.equal(self.d_cache[name][BLOCKS], want[BLOCKS]), name

    def plans(self) -> PlanCache:
        reader = self.d.registered.reader
        assert reader is not None
        remote = reader.engines.get("prefill")
        assert remote is not None
        return remote.plans


def test_a_producer_that_registers_again_is_planned_afresh_and_nothing_leaks() -> None:
    """The same ids from a restarted producer with twice the blocks (other dlist indices):
    the consumer attaches it afresh, with an empty cache, and reads the new instance's bytes.
    Checked against a broken build (one cache per consumer, kept across attachments): the
    second instance's load reuses the old plan's indices and reads the wrong blocks."""
    pair = Pair()
    try:
        pair.load("p-1")
        first = pair.plans()
        pair.load("p-2")
        assert (first.hits, first.misses) == (1, 1)
        pair.restart(num_blocks=32)
        reader = pair.d.registered.reader
        assert reader is not None
        wait_for(lambda: reader.engines.get("prefill") is None)  # gone: detached
        pair.load("p-3")
        fresh = pair.plans()
        assert fresh is not first and (fresh.hits, fresh.misses) == (0, 1)
        pair.d.check_integrity()
    finally:
        pair.p.shutdown()
        pair.d.shutdown()
    assert pair.p.leaked == LiveCounts(0, 0, 0, 0) and pair.d.leaked == LiveCounts(0, 0, 0, 0)
