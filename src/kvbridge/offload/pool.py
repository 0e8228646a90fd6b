"""CPUBlockPool: which CPU block holds which (group, block hash), in LRU order, with pins."""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

from kvbridge.connector.types import (
    BlockRemoved,
    BlockStored,
    IntegrityError,
    KVCacheEvent,
    Medium,
)

# (KV cache group, block hash): the same tokens in two groups are two different entries.
BlockKey = tuple[int, bytes]


class StorePlan(NamedTuple):
    """Answer of ``prepare_store``: which of the asked hashes got a CPU block to write."""

    indices: list[int]  # positions in the asked hashes that will be stored
    block_ids: list[int]  # CPU block for each of those positions
    num_cached: int  # already on the CPU tier
    num_in_flight: int  # an earlier store is writing them
    num_dropped: int  # no free block and nothing evictable
    num_evicted: int


class CPUBlockPool:
    """Runs in the scheduler; owns the CPU block ids, their hashes, LRU order and pins.

    A block is *free*, *storing* (reserved by ``prepare_store`` until ``complete_store``) or
    *cached* (indexed by its ``BlockKey``). Cached blocks with no pin sit in the LRU and may be
    evicted; ``prepare_load`` pins cached blocks until ``complete_load``. Blocks given in prefix
    order are touched last to first, so a prefix is evicted from its end: a hit needs an
    unbroken run from the start, and its first blocks are what other prompts share.
    ``complete_x(success=False)`` rolls back: a failed store frees its blocks, a failed or
    cancelled load drops its pins. Block ids are shared by all KV cache groups (as the engine's
    GPU ids are); a block belongs to the one group of its key, and LRU order spans groups.
    """

    def __init__(self, num_blocks: int, block_size: int, num_groups: int = 1) -> None:
        if num_blocks < 1:
            raise ValueError(f"CPUBlockPool: num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_groups = num_groups  # > 1: events name their group
        self._free: list[int] = list(range(num_blocks))  # min-heap: low ids first, runs stay long
        self._key_of: list[BlockKey | None] = [None] * num_blocks  # block id -> key
        self._refs: list[int] = [0] * num_blocks  # block id -> pins
        self._cached: dict[BlockKey, int] = {}  # key -> block id, stored and readable
        self._storing: dict[BlockKey, int] = {}  # key -> block id, store in flight
        self._lru: OrderedDict[int, None] = OrderedDict()  # unpinned cached ids, oldest first
        self._events: list[KVCacheEvent] = []

    # -- gauges ---------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def num_storing(self) -> int:
        return len(self._storing)

    @property
    def num_pinned(self) -> int:
        return len(self._cached) - len(self._lru)

    @property
    def num_pins(self) -> int:
        """Pins held over all blocks (a block loaded by two requests counts twice)."""
        return sum(self._refs)

    def is_cached(self, block_hash: bytes, group: int = 0) -> bool:
        return (group, block_hash) in self._cached

    def is_storing(self, block_hash: bytes, group: int = 0) -> bool:
        return (group, block_hash) in self._storing

    def key_of(self, block_id: int) -> BlockKey | None:
        """The (group, hash) that ``block_id`` holds or is being stored for; None if free."""
        return self._key_of[block_id]

    def cached_block_id(self, block_hash: bytes, group: int = 0) -> int | None:
        """The CPU block holding ``block_hash`` of ``group``, if cached."""
        return self._cached.get((group, block_hash))

    # -- load -----------------------------------------------------------------------------
    def lookup(self, hashes: Sequence[bytes], group: int = 0) -> int:
        """Number of consecutive cached hashes of ``group`` from the start of ``hashes``."""
        n = 0
        for h in hashes:
            if (group, h) not in self._cached:
                break
            n += 1
        return n

    def prepare_load(self, hashes: Sequence[bytes], group: int = 0) -> list[int]:
        """Pin the cached blocks of ``hashes`` in ``group`` (all must be cached); their ids."""
        keys = [(group, h) for h in hashes]
        missing = [k for k in keys if k not in self._cached]
        if missing:
            raise KeyError(f"CPUBlockPool.prepare_load: {len(missing)} hash(es) not cached")
        ids = [self._cached[k] for k in keys]
        for b in ids:
            self._refs[b] += 1
            self._lru.pop(b, None)
        return ids

    def complete_load(self, block_ids: Sequence[int], success: bool) -> None:
        """Drop the pins of a finished, failed or cancelled load; unpinned blocks become MRU."""
        for b in block_ids:
            if self._refs[b] <= 0:
                raise RuntimeError(f"CPUBlockPool.complete_load: block {b} is not pinned")
        for b in reversed(block_ids):  # the prefix's first block becomes the most recent
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._lru[b] = None

    # -- store ----------------------------------------------------------------------------
    def prepare_store(self, hashes: Sequence[bytes], group: int = 0) -> StorePlan:
        """Reserve a block for each hash of ``group`` neither cached nor in flight, evicting
        LRU blocks (of any group)."""
        indices: list[int] = []
        ids: list[int] = []
        cached = in_flight = dropped = 0
        evicted: list[BlockKey] = []
        for block_hash in reversed(hashes):  # touched last to first (see the class docstring)
            hit = self._cached.get((group, block_hash))
            if hit is not None and hit in self._lru:
                self._lru.move_to_end(hit)
        for i, block_hash in enumerate(hashes):
            h = (group, block_hash)
            if h in self._cached:
                cached += 1
                continue
            if h in self._storing:
                in_flight += 1
                continue
            block = self._allocate(evicted)
            if block is None:
                dropped += 1
                continue
            self._key_of[block] = h
            self._storing[h] = block
            indices.append(i)
            ids.append(block)
        for g, group_hashes in self._by_group(evicted):
            self._events.append(BlockRemoved(group_hashes, Medium.CPU, g))
        return StorePlan(indices, ids, cached, in_flight, dropped, len(evicted))

    def complete_store(self, block_ids: Sequence[int], success: bool) -> None:
        """Index the written blocks (success) or give them back to the free list (failure)."""
        stored: list[BlockKey] = []
        keys: list[BlockKey] = []
        for b in block_ids:
            h = self._key_of[b]
            if h is None or self._storing.get(h) != b:
                raise RuntimeError(f"CPUBlockPool.complete_store: block {b} is not being stored")
            keys.append(h)
        for b, h in zip(block_ids, keys, strict=True):
            del self._storing[h]
            if success:
                self._cached[h] = b
                stored.append(h)
            else:
                self._key_of[b] = None
                heapq.heappush(self._free, b)
        if success:
            for b in reversed(block_ids):  # touched last to first (see the class docstring)
                self._lru[b] = None
        for g, group_hashes in self._by_group(stored):
            self._events.append(BlockStored(group_hashes, Medium.CPU, self.block_size, g))

    def _allocate(self, evicted: list[BlockKey]) -> int | None:
        if self._free:
            return heapq.heappop(self._free)
        if not self._lru:
            return None
        block, _ = self._lru.popitem(last=False)
        h = self._key_of[block]
        if h is not None:
            del self._cached[h]
            evicted.append(h)
        return block

    def _by_group(self, keys: list[BlockKey]) -> list[tuple[int | None, tuple[bytes, ...]]]:
        """Hashes per group, in first-seen order; the group is None on a single-group cache."""
        groups: dict[int, list[bytes]] = {}
        for g, block_hash in keys:
            groups.setdefault(g, []).append(block_hash)
        return [(g if self.num_groups > 1 else None, tuple(hs)) for g, hs in groups.items()]

    # -- events and checks ----------------------------------------------------------------
    def take_events(self) -> list[KVCacheEvent]:
        events, self._events = self._events, []
        return events

    def check_integrity(self) -> None:
        """Raise ``IntegrityError`` if the free / storing / cached partition or pins are broken."""
        seen: dict[int, str] = {}

        def claim(block: int, state: str) -> None:
            if not 0 <= block < self.num_blocks:
                raise IntegrityError(f"CPUBlockPool integrity: {state} block {block} out of range")
            if block in seen:
                raise IntegrityError(
                    f"CPUBlockPool integrity: block {block} is both {seen[block]} and {state}"
                )
            seen[block] = state

        for b in self._free:
            claim(b, "free")
            if self._key_of[b] is not None or self._refs[b]:
                raise IntegrityError(f"CPUBlockPool integrity: free block {b} has a hash or pins")
        for table, state in ((self._storing, "storing"), (self._cached, "cached")):
            for h, b in table.items():
                claim(b, state)
                if self._key_of[b] != h:
                    raise IntegrityError(f"CPUBlockPool integrity: {state} block {b} hash mismatch")
        for b in range(self.num_blocks):
            if b not in seen:
                raise IntegrityError(f"CPUBlockPool integrity: block {b} is in no state (leaked)")
            pinned = self._refs[b] > 0
            if self._refs[b] < 0:
                raise IntegrityError(f"CPUBlockPool integrity: block {b} has negative pins")
            if seen[b] == "storing" and pinned:
                raise IntegrityError(f"CPUBlockPool integrity: storing block {b} is pinned")
            if seen[b] == "cached" and pinned == (b in self._lru):
                raise IntegrityError(
                    f"CPUBlockPool integrity: cached block {b} pinned={pinned} but "
                    f"in_lru={b in self._lru}"
                )
        stray = [b for b in self._lru if seen.get(b) != "cached"]
        if stray:
            raise IntegrityError(f"CPUBlockPool integrity: LRU holds non-cached blocks {stray}")
