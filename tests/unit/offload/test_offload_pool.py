"""CPUBlockPool: LRU order, pins, drops, dedup, rollback, events and integrity."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbridge.connector.types import BlockRemoved, BlockStored, IntegrityError, Medium
from kvbridge.offload.pool import CPUBlockPool


def h(i: int) -> bytes:
    return i.to_bytes(4, "big")


def stored_pool(n: int, hashes: list[int]) -> CPUBlockPool:
    pool = CPUBlockPool(n, block_size=4)
    plan = pool.prepare_store([h(i) for i in hashes])
    pool.complete_store(plan.block_ids, success=True)
    pool.check_integrity()
    return pool


def test_fresh_blocks_come_out_in_id_order() -> None:
    pool = CPUBlockPool(6, block_size=4)
    assert pool.prepare_store([h(1), h(2), h(3)]).block_ids == [0, 1, 2]
    pool.check_integrity()


def test_lru_evicts_least_recently_used_and_loads_touch() -> None:
    pool = stored_pool(3, [1, 2, 3])
    ids = pool.prepare_load([h(1)])  # 1 becomes most recently used once released
    pool.complete_load(ids, success=True)
    plan = pool.prepare_store([h(4), h(5)])
    assert plan.num_evicted == 2
    assert [pool.is_cached(h(i)) for i in (1, 2, 3)] == [True, False, False]
    events = pool.take_events()
    assert events[-1] == BlockRemoved((h(3), h(2)), Medium.CPU)  # a prefix goes from its end
    pool.check_integrity()


def test_a_prefix_is_evicted_from_its_end_so_its_start_still_hits() -> None:
    """Stored or loaded in prefix order, a prefix's first blocks stay longest: a hit needs an
    unbroken run from the start. Checked against the build that touched in prefix order: the
    first blocks went first and the rest could never hit again."""
    pool = stored_pool(4, [1, 2, 3, 4])
    plan = pool.prepare_store([h(10), h(11)])
    assert plan.num_evicted == 2 and pool.lookup([h(1), h(2), h(3), h(4)]) == 2  # 4, 3 went
    pool.complete_store(plan.block_ids, success=True)
    ids = pool.prepare_load([h(10), h(11)])
    pool.complete_load(ids, success=True)
    for new in (12, 13, 14):  # evicts 2, then 1, then the loaded prefix's end: 11
        pool.complete_store(pool.prepare_store([h(new)]).block_ids, success=True)
    assert pool.lookup([h(10), h(11)]) == 1 and not pool.is_cached(h(1))
    pool.check_integrity()


def test_store_dedup_touches_cached_block() -> None:
    pool = stored_pool(2, [1, 2])
    assert pool.prepare_store([h(1)]).num_cached == 1  # touch: 2 is now the oldest
    pool.prepare_store([h(3)])
    assert pool.is_cached(h(1)) and not pool.is_cached(h(2))
    pool.check_integrity()


def test_pins_survive_eviction_pressure() -> None:
    pool = stored_pool(3, [1, 2, 3])
    pinned = pool.prepare_load([h(1), h(2)])
    plan = pool.prepare_store([h(10), h(11), h(12)])
    assert plan.num_evicted == 1 and plan.num_dropped == 2
    assert pool.is_cached(h(1)) and pool.is_cached(h(2)) and not pool.is_cached(h(3))
    assert pool.num_pinned == 2
    pool.complete_load(pinned, success=True)
    assert pool.num_pinned == 0
    pool.check_integrity()


def test_full_pool_drops_and_counts() -> None:
    pool = CPUBlockPool(2, block_size=4)
    first = pool.prepare_store([h(1), h(2)])  # both storing: nothing evictable
    plan = pool.prepare_store([h(3), h(4), h(5)])
    assert plan.block_ids == [] and plan.num_dropped == 3
    pool.complete_store(first.block_ids, success=True)
    pool.check_integrity()


def test_no_double_store_of_a_block_in_flight() -> None:
    pool = CPUBlockPool(4, block_size=4)
    first = pool.prepare_store([h(1), h(2)])
    second = pool.prepare_store([h(2), h(3), h(3)])
    assert second.num_in_flight == 2  # h(2) from the first plan, h(3) from itself
    assert second.indices == [1] and len(second.block_ids) == 1
    assert pool.num_storing == 3
    assert pool.lookup([h(1)]) == 0  # in flight is not a hit
    pool.complete_store(first.block_ids, success=True)
    pool.complete_store(second.block_ids, success=True)
    assert pool.lookup([h(1), h(2), h(3)]) == 3
    pool.check_integrity()


def test_failed_store_rolls_back() -> None:
    pool = CPUBlockPool(2, block_size=4)
    plan = pool.prepare_store([h(1), h(2)])
    pool.complete_store(plan.block_ids, success=False)
    assert pool.num_free == 2 and not pool.is_cached(h(1)) and pool.take_events() == []
    assert pool.prepare_store([h(1)]).block_ids == [0]  # storable again
    pool.check_integrity()


def test_cancelled_load_drops_pins_and_keeps_data() -> None:
    pool = stored_pool(2, [1, 2])
    ids = pool.prepare_load([h(1), h(2)])
    pool.prepare_load([h(1)])
    assert pool.num_pins == 3
    pool.complete_load(ids, success=False)
    assert pool.num_pins == 1 and pool.lookup([h(1), h(2)]) == 2
    with pytest.raises(RuntimeError, match="not pinned"):
        pool.complete_load([ids[1]], success=True)
    pool.check_integrity()


def test_lookup_counts_consecutive_hits_only() -> None:
    pool = stored_pool(4, [1, 2, 4])
    assert pool.lookup([h(1), h(2), h(3), h(4)]) == 2
    with pytest.raises(KeyError):
        pool.prepare_load([h(3)])


def test_stored_event_has_medium_cpu() -> None:
    pool = stored_pool(2, [7])
    assert pool.take_events() == [BlockStored((h(7),), Medium.CPU, 4)]
    assert pool.take_events() == []


def test_check_integrity_catches_a_leaked_block() -> None:
    pool = stored_pool(3, [1])
    pool._free.pop()  # a block in no state
    with pytest.raises(IntegrityError, match="leaked"):
        pool.check_integrity()


def test_check_integrity_catches_pinned_block_in_lru() -> None:
    pool = stored_pool(3, [1])
    pool._refs[0] = 1
    with pytest.raises(IntegrityError, match="pinned=True"):
        pool.check_integrity()


_ops = st.lists(
    st.tuples(st.sampled_from(["store", "done", "fail", "load", "unload"]), st.integers(0, 11)),
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(_ops)
def test_random_operations_keep_integrity(ops: list[tuple[str, int]]) -> None:
    pool = CPUBlockPool(5, block_size=4)
    storing: list[list[int]] = []
    loads: list[list[int]] = []
    for op, i in ops:
        if op == "store":
            storing.append(pool.prepare_store([h(i), h(i + 1)]).block_ids)
        elif op in ("done", "fail") and storing:
            pool.complete_store(storing.pop(i % len(storing)), success=op == "done")
        elif op == "load" and pool.lookup([h(i)]):
            loads.append(pool.prepare_load([h(i)]))
        elif op == "unload" and loads:
            pool.complete_load(loads.pop(i % len(loads)), success=True)
        pool.check_integrity()
        assert pool.num_free + pool.num_storing + pool.num_cached == 5
