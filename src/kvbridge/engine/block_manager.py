"""BlockManager: the fixed pool of KV blocks, per-request block tables and the prefix cache.

Torch-free: it hands out block ids; the worker owns the tensors they index.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import NamedTuple

from kvbridge.connector.types import IntegrityError, RequestView

logger = logging.getLogger(__name__)


class DoubleFreeError(RuntimeError):
    """``free`` was called for a request that holds no blocks (already freed, or never had)."""


@dataclass
class Block:
    """One KV block: ref count, chained hash and token ids (the collision guard)."""

    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None
    token_ids: tuple[int, ...] | None = None  # collision guard for block_hash


class ComputedBlocks(NamedTuple):
    """Local prefix-cache hit: the leading blocks whose KV is already in the cache."""

    block_ids: list[int]
    num_tokens: int


class PrefixCacheStats(NamedTuple):
    """Prefix-cache lookups and hits, in blocks and tokens."""

    queried_tokens: int
    hit_tokens: int
    hit_blocks: int
    evicted_blocks: int


class BlockManager:
    """Runs in the scheduler; owns the block pool, every request's block table and the prefix cache.

    A block is in exactly one state: *free* (no hash), *cached-free* (ref 0 with a hash: a
    prefix hit can revive it, eviction takes the least recently freed first) or *in use*
    (ref > 0). Only blocks whose KV is confirmed computed get a hash (``cache_blocks``).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if not isinstance(num_blocks, int) or num_blocks <= 0:
            raise ValueError(f"num_gpu_blocks: must be a positive int, got {num_blocks!r}")
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size: must be a positive int, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # LRU first
        self._hash_to_block: dict[bytes, int] = {}  # hash -> block id holding it
        self._tables: dict[str, list[int]] = {}  # request id -> block ids
        self._num_hashed: dict[str, int] = {}  # request id -> leading blocks already hashed
        self._queried_tokens = 0
        self._hit_tokens = 0
        self._hit_blocks = 0
        self._evicted = 0

    # -- queries --------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take (free plus cached-free)."""
        return len(self._free) + len(self._cached_free)

    @property
    def num_cached_free_blocks(self) -> int:
        return len(self._cached_free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(
            self._queried_tokens, self._hit_tokens, self._hit_blocks, self._evicted
        )

    def has_blocks(self, request_id: str) -> bool:
        return request_id in self._tables

    def owners(self) -> set[str]:
        """Ids of the requests holding blocks."""
        return set(self._tables)

    def block_ids(self, request_id: str) -> list[int]:
        """A copy of the request's block table (empty if it holds none)."""
        return list(self._tables.get(request_id, ()))

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, request: RequestView) -> ComputedBlocks:
        """Longest run of leading full blocks found in the prefix cache (token ids verified).

        Leaves at least the last token uncomputed so the step that follows yields logits.
        """
        if not self.enable_prefix_caching:
            return ComputedBlocks([], 0)
        bs = self.block_size
        tokens = request.all_token_ids
        hashes = request.block_hashes
        hits: list[int] = []
        for i in range(min(len(hashes), (request.num_tokens - 1) // bs)):
            block_id = self._hash_to_block.get(hashes[i])
            if block_id is None:
                break
            if self._blocks[block_id].token_ids != tuple(tokens[i * bs : (i + 1) * bs]):
                logger.warning("block hash collision at block %d of %s", i, request.request_id)
                break
            hits.append(block_id)
        return ComputedBlocks(hits, len(hits) * bs)

    # -- allocation -----------------------------------------------------------------------------
    def can_allocate(
        self, request_id: str, num_tokens: int, computed: ComputedBlocks | None = None
    ) -> bool:
        return self._num_new_blocks(request_id, num_tokens, computed) is not None

    def allocate(
        self, request: RequestView, num_tokens: int, computed: ComputedBlocks | None = None
    ) -> list[int] | None:
        """Grow the request's table to cover ``num_tokens`` token slots; ``None`` if out of blocks.

        ``computed`` (first allocation only) are prefix-cache hits put at the table's head.
        Returns the newly taken block ids; on ``None`` nothing changed.
        """
        rid = request.request_id
        num_new = self._num_new_blocks(rid, num_tokens, computed)
        if num_new is None:
            return None
        table = self._tables.setdefault(rid, [])
        if computed is not None and not table:
            self._queried_tokens += request.num_tokens
            self._hit_tokens += computed.num_tokens
            self._hit_blocks += len(computed.block_ids)
            for block_id in computed.block_ids:
                self._touch(block_id)
            table.extend(computed.block_ids)
            self._num_hashed[rid] = len(computed.block_ids)
        new = [self._take() for _ in range(num_new)]
        table.extend(new)
        return new

    def cache_blocks(self, request: RequestView, num_computed_tokens: int) -> None:
        """Publish the hashes of the request's full blocks whose KV is confirmed computed."""
        if not self.enable_prefix_caching:
            return
        rid = request.request_id
        table = self._tables[rid]
        bs = self.block_size
        start = self._num_hashed.get(rid, 0)
        end = min(num_computed_tokens // bs, len(table))
        if end <= start:
            return
        hashes = request.block_hashes
        tokens = request.all_token_ids
        for i in range(start, end):
            block = self._blocks[table[i]]
            if block.block_hash is None and hashes[i] not in self._hash_to_block:
                block.block_hash = hashes[i]
                block.token_ids = tuple(tokens[i * bs : (i + 1) * bs])
                self._hash_to_block[hashes[i]] = block.block_id
        self._num_hashed[rid] = end

    def free(self, request_id: str) -> None:
        """Release the request's blocks (tail first, so tails are evicted first)."""
        table = self._tables.pop(request_id, None)
        if table is None:
            raise DoubleFreeError(f"free({request_id!r}): request holds no blocks")
        self._num_hashed.pop(request_id, None)
        for block_id in reversed(table):
            block = self._blocks[block_id]
            if block.ref_count <= 0:
                raise IntegrityError(f"block {block_id} freed with ref_count {block.ref_count}")
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.block_hash is not None:
                    self._cached_free[block_id] = None
                else:
                    self._free.append(block_id)

    def invalidate_blocks(self, block_ids: set[int] | frozenset[int]) -> None:
        """Forget the prefix-cache identity of blocks whose contents are not trustworthy."""
        for block_id in block_ids:
            if not 0 <= block_id < self.num_blocks:
                logger.warning("invalidate_blocks: ignoring out-of-range block id %d", block_id)
                continue
            self._drop_hash(self._blocks[block_id])
            if block_id in self._cached_free:
                del self._cached_free[block_id]
                self._free.append(block_id)

    def reset_prefix_cache(self) -> None:
        """Drop every cached-free block's hash (in-use blocks keep theirs)."""
        self.invalidate_blocks(frozenset(self._cached_free))

    # -- internals ------------------------------------------------------------------------------
    def _num_new_blocks(
        self, request_id: str, num_tokens: int, computed: ComputedBlocks | None
    ) -> int | None:
        have = len(self._tables.get(request_id, ()))
        reviving = 0
        if computed is not None and have == 0:
            have = len(computed.block_ids)
            reviving = sum(1 for b in computed.block_ids if self._blocks[b].ref_count == 0)
        num_new = max(0, self.blocks_needed(num_tokens) - have)
        return num_new if num_new + reviving <= self.num_free_blocks else None

    def _touch(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            del self._cached_free[block_id]
        block.ref_count += 1

    def _take(self) -> int:
        if self._free:
            block_id = self._free.popleft()
        else:
            block_id, _ = self._cached_free.popitem(last=False)
            self._drop_hash(self._blocks[block_id])
            self._evicted += 1
        self._blocks[block_id].ref_count = 1
        return block_id

    def _drop_hash(self, block: Block) -> None:
        if block.block_hash is not None and self._hash_to_block.get(block.block_hash) == (
            block.block_id
        ):
            del self._hash_to_block[block.block_hash]
        block.block_hash = None
        block.token_ids = None

    # -- invariants -----------------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Raise ``IntegrityError`` unless free + in use + cached-free == total, each block in
        exactly one state, ref counts equal table references and the hash index is consistent."""
        state: dict[int, str] = {}

        def put(block_id: int, name: str) -> None:
            if block_id in state:
                raise IntegrityError(f"block {block_id} is both {state[block_id]} and {name}")
            state[block_id] = name

        for b in self._free:
            put(b, "free")
        for b in self._cached_free:
            put(b, "cached-free")
        refs: dict[int, int] = {}
        for rid, table in self._tables.items():
            if len(set(table)) != len(table):
                raise IntegrityError(f"request {rid} holds a block twice: {table}")
            for b in table:
                refs[b] = refs.get(b, 0) + 1
        for block in self._blocks:
            b = block.block_id
            if block.ref_count != refs.get(b, 0):
                raise IntegrityError(
                    f"block {b}: ref_count {block.ref_count} but {refs.get(b, 0)} table refs"
                )
            if block.ref_count > 0:
                put(b, "in use")
            elif b not in state:
                raise IntegrityError(f"block {b} has ref_count 0 but is in no free list")
            if state[b] == "free" and block.block_hash is not None:
                raise IntegrityError(f"free block {b} still has a hash")
            if state[b] == "cached-free" and block.block_hash is None:
                raise IntegrityError(f"cached-free block {b} has no hash")
        n_free, n_cached = len(self._free), len(self._cached_free)
        n_used = sum(1 for s in state.values() if s == "in use")
        if n_free + n_cached + n_used != self.num_blocks:
            raise IntegrityError(
                f"free {n_free} + cached-free {n_cached} + in use {n_used} != {self.num_blocks}"
            )
        for h, b in self._hash_to_block.items():
            if self._blocks[b].block_hash != h:
                raise IntegrityError(f"hash index points to block {b}, which holds another hash")
        for block in self._blocks:
            bh = block.block_hash
            if bh is not None and self._hash_to_block.get(bh) != block.block_id:
                raise IntegrityError(f"block {block.block_id} has a hash missing from the index")
