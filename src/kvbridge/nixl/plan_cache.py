"""PlanCache: the READ plans of one attached producer's recent small loads, by block ids.

A plan (``transfers.plan_read``) depends on the consumer's regions and layers per KV cache
group, the producer's regions, the block ids and the merge setting. A cache belongs to one
attachment of one producer (``RemoteEngine.plans``): the producer's regions cannot change
under it (a producer that registers again is attached afresh, with a new cache), and it is
bound to the regions (both sides' objects) and layers it plans for first: others empty it.
The ids and the merge setting are the key. Only small READs are cached (up to
``SMALL_PLAN_PAIRS`` block ids a side, as lists): there planning costs a third of the READ's
post inside a worker step (45-70 us for 16 blocks x 8 layers; 4-8 us from the cache); a large
READ's plan is a sliver of its time.

Plans are immutable (their index arrays are only read: NIXL copies them into its request).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from kvbridge.nixl.transfers import KVRegions, ReadPlan, few_ids, plan_read

DEFAULT_PLANS = 64  # per attached producer; the least recently used goes first

PlanKey = tuple[bool, tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]


def plan_key(
    local_ids: Sequence[Sequence[int]], remote_ids: Sequence[Sequence[int]], merge: bool
) -> PlanKey | None:
    """The cache key of a READ of these ids, or None when it is not cached (too many ids, or
    not lists). Ids compare by value, as ``plan_read`` reads them (``int(b)``)."""
    if not (few_ids(local_ids) and few_ids(remote_ids)):
        return None
    return merge, tuple(map(tuple, local_ids)), tuple(map(tuple, remote_ids))


class PlanCache:
    """Runs in a consumer worker, one per attached producer; owns recent small READ plans."""

    def __init__(self, max_plans: int = DEFAULT_PLANS) -> None:
        if max_plans < 1:
            raise ValueError(f"PlanCache: max_plans must be >= 1, got {max_plans}")
        self._max = max_plans
        self._plans: OrderedDict[PlanKey, ReadPlan] = OrderedDict()
        self._bound: tuple[KVRegions, KVRegions, Sequence[Sequence[int]]] | None = None
        self.hits = 0
        self.misses = 0

    def plan(
        self,
        local: KVRegions,
        remote: KVRegions,
        group_layers: Sequence[Sequence[int]],
        local_ids: Sequence[Sequence[int]],
        remote_ids: Sequence[Sequence[int]],
        *,
        merge: bool,
    ) -> ReadPlan:
        """``plan_read``'s plan, from the cache when these ids were planned before (raises
        its ``ValueError`` for bad ids; nothing bad is cached)."""
        bound = self._bound
        if (
            bound is None
            or bound[0] is not local
            or bound[1] is not remote
            or bound[2] is not group_layers
        ):
            self.clear()  # bound to the regions and layers it plans for first
            self._bound = (local, remote, group_layers)
        key = plan_key(local_ids, remote_ids, merge)
        if key is not None:
            cached = self._plans.get(key)
            if cached is not None:
                self._plans.move_to_end(key)
                self.hits += 1
                return cached
        plan = plan_read(local, remote, group_layers, local_ids, remote_ids, merge=merge)
        if key is not None:
            self.misses += 1
            self._plans[key] = plan
            if len(self._plans) > self._max:
                self._plans.popitem(last=False)
        return plan

    def __len__(self) -> int:
        return len(self._plans)

    def clear(self) -> None:
        self._plans.clear()
        self._bound = None
