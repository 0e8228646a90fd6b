"""HitMatcher: finds a request's CPU hit across KV cache groups, pins it, hands it over."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from kvbridge.connector.types import BlockIds, RequestView
from kvbridge.offload.groups import HitRule
from kvbridge.offload.pool import CPUBlockPool


@dataclass
class Match:
    """A hit on blocks ``[start_block, end_block)``, pinned until allocated or released."""

    start_block: int  # first block after the locally computed prefix
    end_block: int
    pinned: list[dict[int, int]]  # group -> {block position: pinned CPU block id}

    @property
    def cpu_block_ids(self) -> list[int]:
        return [b for group in self.pinned for b in group.values()]


class GroupLoad(NamedTuple):
    """What one group loads: ``gpu_block_ids[i]`` <- ``cpu_block_ids[i]``."""

    gpu_block_ids: list[int]
    cpu_block_ids: list[int]


class HitMatcher:
    """Runs in the scheduler; turns ``HitRule`` answers into pins on the CPU pool.

    ``find`` pins every block a hit needs (per group); ``take`` trims a hit the engine
    accepted only in part and says what to load; ``release`` drops the pins of a hit that
    will not be loaded.
    """

    def __init__(self, pool: CPUBlockPool, rule: HitRule) -> None:
        self.pool = pool
        self.rule = rule

    def find(self, hashes: list[bytes], start: int, end: int) -> Match | None:
        """The longest hit in blocks ``[start, end)``, pinned; None without one."""
        hit = self.rule.longest_hit(start, end, lambda g, i: self.pool.is_cached(hashes[i], g))
        if hit <= start:
            return None
        pinned = []
        for g in range(self.rule.num_groups):
            positions = list(self.rule.needed(g, start, hit))
            ids = self.pool.prepare_load([hashes[i] for i in positions], g)
            pinned.append(dict(zip(positions, ids)))
        return Match(start, hit, pinned)

    def release(self, match: Match) -> None:
        self.pool.complete_load(match.cpu_block_ids, success=False)

    def take(
        self, request: RequestView, match: Match, block_ids: BlockIds, end: int
    ) -> list[GroupLoad]:
        """Per group, the blocks that a hit ending at block ``end`` loads (the
        null blocks of sliding-window groups left out). Pins what a shorter hit newly needs,
        releases the rest; raises ``RuntimeError`` (nothing changed) if it cannot be served."""
        hashes = request.block_hashes
        wanted: list[list[int]] = []
        for g, table in enumerate(block_ids):
            needed = self.rule.needed(g, match.start_block, end)
            if needed and needed[-1] >= len(table):
                raise RuntimeError(
                    f"request {request.request_id}: group {g} has {len(table)} blocks, a hit "
                    f"to block {end} needs {end}"
                )
            want = [i for i in needed if not self.rule.is_null(g, table[i])]
            lost = [
                i
                for i in want
                if i not in match.pinned[g] and not self.pool.is_cached(hashes[i], g)
            ]
            if lost:  # only when the engine accepts fewer tokens than matched
                raise RuntimeError(
                    f"request {request.request_id}: a hit of {end - match.start_block} blocks "
                    f"needs block {lost[0]} of group {g}, which is not on the CPU tier"
                )
            wanted.append(want)
        loads: list[GroupLoad] = []
        release: list[int] = []
        for g, want in enumerate(wanted):
            have = match.pinned[g]
            missing = [i for i in want if i not in have]
            fresh = dict(zip(missing, self.pool.prepare_load([hashes[i] for i in missing], g)))
            keep = set(want)
            release += [b for i, b in have.items() if i not in keep]
            cpu = [have[i] if i in have else fresh[i] for i in want]
            loads.append(GroupLoad([block_ids[g][i] for i in want], cpu))
        if release:
            self.pool.complete_load(release, success=False)
        return loads
