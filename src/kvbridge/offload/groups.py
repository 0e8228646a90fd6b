"""HitRule: which blocks of each KV cache group a CPU hit needs (full and sliding window)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

# In a sliding-window group the engine puts this id where a block left the window (vLLM's
# null block). It holds nothing: it is never stored and never loaded into.
NULL_BLOCK_ID = 0


class HitRule:
    """Runs in the scheduler; says which block positions of each group a hit of ``end``
    blocks needs, given that the engine already holds the first ``start`` (its own prefix).

    - Full attention: every block of ``[start, end)``.
    - Sliding window of ``W`` tokens: the token after the hit attends to the ``W - 1`` tokens
      before it, so the last ``ceil((W - 1) / block_size)`` blocks before ``end`` (those at or
      after ``start``); earlier blocks are never read (the engine holds null blocks there).

    A single-group cache has one full group: the rule reduces to "every block after the
    local prefix", as before groups existed.
    """

    def __init__(self, windows: Sequence[int | None], block_size: int) -> None:
        self.block_size = block_size
        # group -> blocks needed before the end of a hit (None: all of them)
        self.window_blocks: list[int | None] = [
            None if w is None else -(-(w - 1) // block_size) for w in windows
        ]

    @property
    def num_groups(self) -> int:
        return len(self.window_blocks)

    def is_sliding(self, group: int) -> bool:
        return self.window_blocks[group] is not None

    def is_null(self, group: int, block_id: int) -> bool:
        """Whether ``block_id`` is the null block (only sliding-window groups have one)."""
        return block_id == NULL_BLOCK_ID and self.is_sliding(group)

    def needed(self, group: int, start: int, end: int) -> range:
        """Positions of ``group`` a hit of blocks ``[start, end)`` must load."""
        need = self.window_blocks[group]
        if need is None:
            return range(start, end)
        return range(max(start, end - need), end)

    def longest_hit(self, start: int, end: int, is_cached: Callable[[int, int], bool]) -> int:
        """The largest ``e`` in ``start..end`` such that every group has the positions
        ``needed(g, start, e)`` cached (``is_cached(group, position)``); ``start`` if none."""
        e = end
        for g, need in enumerate(self.window_blocks):
            if need is None:  # full attention: a run of hits from start
                n = start
                while n < e and is_cached(g, n):
                    n += 1
                e = n
        sliding = [g for g, need in enumerate(self.window_blocks) if need is not None]
        if e <= start or not sliding:
            return e
        # run[g][i - start]: consecutive cached positions of g ending at i
        runs: dict[int, list[int]] = {}
        for g in sliding:
            run, runs[g] = 0, []
            for i in range(start, e):
                run = run + 1 if is_cached(g, i) else 0
                runs[g].append(run)
        for cand in range(e, start, -1):
            if all(runs[g][cand - 1 - start] >= len(self.needed(g, start, cand)) for g in sliding):
                return cand
        return start
