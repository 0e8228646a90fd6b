"""BlockManager: allocation, ref counts, prefix cache with collision guard, LRU, invariants."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbridge.connector.types import IntegrityError, SimpleRequest
from kvbridge.engine.block_manager import BlockManager, DoubleFreeError
from kvbridge.engine.request import Request
from kvbridge.engine.sampling import SamplingParams
from kvbridge.kit.hashing import BlockHasher

BS = 4
HASHER = BlockHasher(BS)


def req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(), hasher=HASHER)


def computed(bm: BlockManager, r: Request) -> None:
    """Allocate ``r`` with its prefix hits and mark every token computed (hashes published)."""
    hit = bm.get_computed_blocks(r)
    assert bm.allocate(r, r.num_tokens, hit) is not None
    bm.cache_blocks(r, r.num_tokens)
    bm.check_integrity()


def test_allocate_grows_tables_and_refuses_without_side_effects() -> None:
    bm = BlockManager(4, BS)
    a = req("a", list(range(6)))
    assert bm.allocate(a, 6) == [0, 1]
    assert bm.allocate(a, 8) == [] and bm.allocate(a, 9) == [2]
    b = req("b", list(range(9)))
    assert bm.allocate(b, 9) is None  # needs 3, 1 left
    assert not bm.has_blocks("b") and bm.num_free_blocks == 1
    bm.check_integrity()
    bm.free("a")
    with pytest.raises(DoubleFreeError):
        bm.free("a")
    bm.check_integrity()
    assert bm.num_free_blocks == 4


def test_prefix_hit_shares_blocks_and_leaves_the_last_token() -> None:
    bm = BlockManager(16, BS)
    a = req("a", list(range(12)))  # 3 full blocks
    computed(bm, a)
    same = req("same", list(range(12)))
    hit = bm.get_computed_blocks(same)
    assert hit.num_tokens == 8 and hit.block_ids == bm.block_ids("a")[:2]  # not the last block
    longer = req("longer", [*range(12), 99])
    assert bm.get_computed_blocks(longer).num_tokens == 12
    assert bm.allocate(longer, 13, bm.get_computed_blocks(longer)) == [3]
    assert bm.block_ids("longer")[:3] == bm.block_ids("a")
    bm.check_integrity()  # ref counts 2 on the shared blocks
    bm.free("a")
    assert bm.num_free_blocks == 16 - 4  # shared blocks still held by `longer`
    stats = bm.stats()
    assert (stats.hit_blocks, stats.hit_tokens, stats.queried_tokens) == (3, 12, 12 + 13)


def test_hash_collision_is_caught_by_the_token_guard() -> None:
    bm = BlockManager(8, BS)
    a = req("a", [1, 2, 3, 4, 5])
    computed(bm, a)
    forged = SimpleRequest("f", [9, 9, 9, 9, 9], block_hashes=list(a.block_hashes))
    assert bm.get_computed_blocks(forged).num_tokens == 0


def test_freed_cached_blocks_are_revived_then_evicted_lru_tail_first() -> None:
    bm = BlockManager(6, BS)
    a = req("a", list(range(13)))  # blocks 0-3, three hashed
    computed(bm, a)
    bm.free("a")
    assert bm.num_cached_free_blocks == 3 and bm.num_free_blocks == 6
    # A prefix hit revives the cached blocks (no eviction).
    again = req("again", list(range(13)))
    computed(bm, again)
    assert bm.block_ids("again")[:3] == [0, 1, 2] and bm.stats().evicted_blocks == 0
    bm.free("again")
    # Uncached free blocks go first; then the tail of `a`'s chain is evicted before its head.
    other = req("other", list(range(50, 66)))
    assert bm.allocate(other, 16) is not None  # 4 blocks: 3 uncached + block 2 evicted
    assert bm.stats().evicted_blocks == 1
    assert bm.get_computed_blocks(req("probe", list(range(13)))).num_tokens == 8
    bm.check_integrity()


def test_invalidated_blocks_lose_their_prefix_identity() -> None:
    bm = BlockManager(8, BS)
    a = req("a", list(range(9)))
    computed(bm, a)
    bad = bm.block_ids("a")[1]
    bm.invalidate_blocks({bad})
    assert bm.get_computed_blocks(req("b", list(range(9)))).num_tokens == 4
    bm.free("a")
    bm.check_integrity()
    assert bm.num_cached_free_blocks == 1  # only block 0 still cached


def test_disabled_prefix_caching_never_hits() -> None:
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    computed(bm, req("a", list(range(9))))
    assert bm.get_computed_blocks(req("b", list(range(9)))).num_tokens == 0
    bm.free("a")
    assert bm.num_cached_free_blocks == 0


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda bm: bm._free.append(bm._tables["a"][0]), "both"),
        (lambda bm: setattr(bm._blocks[bm._tables["a"][0]], "ref_count", 2), "ref_count"),
        (lambda bm: bm._free.popleft(), "no free list"),
        (lambda bm: bm._hash_to_block.clear(), "missing from the index"),
        (lambda bm: bm._tables["a"].append(bm._tables["a"][0]), "twice"),
    ],
)
def test_check_integrity_reports_each_kind_of_corruption(corrupt, message) -> None:  # type: ignore[no-untyped-def]
    bm = BlockManager(8, BS)
    computed(bm, req("a", list(range(9))))
    corrupt(bm)
    with pytest.raises(IntegrityError, match=message):
        bm.check_integrity()


ops = st.lists(
    st.tuples(st.sampled_from(["alloc", "grow", "free", "invalidate"]), st.integers(0, 5)),
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_random_operations_keep_the_pool_consistent(sequence: list[tuple[str, int]]) -> None:
    bm = BlockManager(10, BS)
    live: dict[str, Request] = {}
    for n, (op, k) in enumerate(sequence):
        rid = f"r{k}"
        if op == "alloc" and rid not in live:
            r = req(rid, [k % 3] * (4 + 3 * k))  # shared prefixes between requests
            hit = bm.get_computed_blocks(r)
            if bm.allocate(r, r.num_tokens, hit) is not None:
                live[rid] = r
                bm.cache_blocks(r, r.num_tokens)
        elif op == "grow" and rid in live:
            r = live[rid]
            r.append_output_token(n % 7)
            if bm.allocate(r, r.num_tokens) is not None:
                bm.cache_blocks(r, r.num_tokens)
        elif op == "free" and rid in live:
            bm.free(rid)
            del live[rid]
        elif op == "invalidate":
            bm.invalidate_blocks({k, k + 4})
        bm.check_integrity()
    for rid in live:
        bm.free(rid)
    bm.check_integrity()
    assert bm.num_free_blocks == 10
