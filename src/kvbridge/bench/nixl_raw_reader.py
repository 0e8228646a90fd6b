"""The raw-NIXL baseline of ``kvbridge bench nixl``: a second NIXL agent in the bench process.

It registers its own zeroed copy of the KV cache, fetches the producer's agent metadata over
the producer's side channel and attaches it as the connector does (``RemoteEngines.attach``:
the producer's per-block dlist, prepared once). ``prepared_read`` plans a READ with
``plan_read``, so it carries the connector's descriptors, and prepares its dlists outside timing;
``timed_read`` times one READ: make transfer + post + poll to DONE + release, no notification.
Both take any agent: ``benchmarks/nixl_modes_peer.py`` runs them on the consumer worker's own.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from kvbridge.bench.nixl_peer import PRODUCER_ID, TIMEOUT_S, kv_caches
from kvbridge.connector.stats import KVConnectorStats
from kvbridge.connector.types import KVCacheSpec
from kvbridge.nixl.handshake import Handshaker, compat_hash
from kvbridge.nixl.registration import cache_regions, check_kv_caches
from kvbridge.nixl.remotes import RemoteEngine, RemoteEngines, memory_type
from kvbridge.nixl.settings import DEFAULT_PROGRESS_DELAY_US, NixlSettings
from kvbridge.nixl.transfers import KVRegions, plan_read
from kvbridge.nixl.transport import (
    LOCAL_AGENT,
    DlistHandle,
    Indices,
    LiveCounts,
    NixlTransport,
)
from kvbridge.nixl.wrapper import NixlWrapper

ENGINE_ID = "bench-raw-reader"


class PreparedRead(NamedTuple):
    """A planned READ's dlists and indices."""

    local_dlist: DlistHandle
    local_indices: Indices
    remote_dlist: DlistHandle
    remote_indices: Indices
    num_descs: int  # descriptors of the plan


class RawSample(NamedTuple):
    seconds: float  # make transfer .. released, wall clock
    nixl_descs: int | None  # NIXL's telemetry descriptor count, when asked for
    post_seconds: float = 0.0  # make transfer .. ``transfer`` returned
    make_seconds: float = 0.0  # make transfer (NIXL builds the request from the indices)


class PlanPost(NamedTuple):
    plan_seconds: float  # plan_read
    make_seconds: float  # make_prepped_xfer
    num_bytes: int


class RawReader:
    """Runs in the bench process; owns a second NIXL agent, its KV copy and the producer's agent.

    - ``close`` releases on every path what the constructor made, and returns what NIXL still
      held after that (all zero unless something leaked).
    """

    def __init__(
        self,
        spec: KVCacheSpec,
        host: str,
        port: int,
        *,
        engine_id: str = PRODUCER_ID,
        timeout_s: float = TIMEOUT_S,
        progress_delay_us: int = DEFAULT_PROGRESS_DELAY_US,
    ) -> None:
        self.timeout_s = timeout_s
        self.cache = kv_caches(spec, None)  # referenced until close: NIXL writes this memory
        layers = check_kv_caches(spec, self.cache)
        self.group_layers = layers.group_layers
        self.regions: KVRegions = cache_regions(spec, layers)
        name = f"{ENGINE_ID}-{uuid.uuid4().hex[:8]}"
        self._t = NixlWrapper(name, progress_delay_us=progress_delay_us)
        self._cleanup = contextlib.ExitStack()
        try:
            mem = memory_type(self.regions)
            reg = self._t.get_reg_descs(self.regions.region_items(), mem)
            self._t.register_memory(reg)
            self._cleanup.callback(self._t.deregister_memory, reg)
            block_descs = self._t.get_xfer_descs(self.regions.block_items(), mem)
            self.local_dlist = self._t.prep_xfer_dlist(LOCAL_AGENT, block_descs)
            self._cleanup.callback(self._t.release_dlist_handle, self.local_dlist)
            handshaker = Handshaker(
                local_engine_id=ENGINE_ID,
                hash_=compat_hash(spec),
                timeout_s=timeout_s,
                max_bytes=NixlSettings.max_handshake_bytes,
                num_threads=1,
            )
            self._cleanup.callback(handshaker.close)
            engines = RemoteEngines(self._t, self.regions, handshaker, KVConnectorStats())
            self._cleanup.callback(engines.close)  # the remote dlist and agent
            metadata = engines.fetch(engine_id, host, port).result(timeout_s)
            self.remote: RemoteEngine = engines.attach(metadata)
        except BaseException:
            self.close()
            raise

    def prepared(
        self,
        local_ids: Sequence[Sequence[int]],
        remote_ids: Sequence[Sequence[int]],
        *,
        merge: bool,
    ) -> contextlib.AbstractContextManager[PreparedRead]:
        """The connector's plan for these block ids (per KV cache group), dlists ready."""
        return prepared_read(
            self._t, self.regions, self.local_dlist, self.remote, self.group_layers,
            local_ids, remote_ids, merge=merge,
        )  # fmt: skip

    def plan_post(
        self,
        local_ids: Sequence[Sequence[int]],
        remote_ids: Sequence[Sequence[int]],
        *,
        merge: bool,
    ) -> PlanPost:
        """The connector's way to post a READ, timed: ``plan_read``, then NIXL's request made
        over the per-block dlists prepared once (then posted and run to DONE, untimed: with
        UCX's cma the copy runs inside ``transfer``)."""
        start = time.perf_counter()
        plan = plan_read(
            self.regions, self.remote.regions, self.group_layers, local_ids, remote_ids,
            merge=merge,
        )  # fmt: skip
        planned = time.perf_counter()
        prepared = PreparedRead(
            self.local_dlist, plan.local_indices, self.remote.dlist, plan.remote_indices,
            plan.num_descs,
        )  # fmt: skip
        sample = timed_read(self._t, prepared, self.timeout_s)
        return PlanPost(planned - start, sample.make_seconds, plan.num_bytes)

    def read(self, prepared: PreparedRead, *, telemetry: bool = False) -> RawSample:
        return timed_read(self._t, prepared, self.timeout_s, telemetry=telemetry)

    def close(self) -> LiveCounts:
        """Release everything (idempotent); returns what the agent still held then."""
        try:
            self._cleanup.close()
        finally:
            leaked = self._t.close()
        return leaked


@contextlib.contextmanager
def prepared_read(
    t: NixlTransport,
    regions: KVRegions,
    local_dlist: DlistHandle,
    remote: RemoteEngine,
    group_layers: Sequence[Sequence[int]],
    local_ids: Sequence[Sequence[int]],
    remote_ids: Sequence[Sequence[int]],
    *,
    merge: bool,
) -> Iterator[PreparedRead]:
    """The connector's READ plan (``plan_read``) on agent ``t``, dlists ready: the per-block
    dlists prepared once, or dlists of the merged runs made here and released on exit."""
    plan = plan_read(regions, remote.regions, group_layers, local_ids, remote_ids, merge=merge)
    if not plan.merged:
        yield PreparedRead(
            local_dlist, plan.local_indices, remote.dlist, plan.remote_indices, plan.num_descs
        )
        return
    owned: list[DlistHandle] = []
    try:
        for agent, items, where in (
            (LOCAL_AGENT, plan.local_items, regions),
            (remote.agent_name, plan.remote_items, remote.regions),
        ):
            owned.append(t.prep_xfer_dlist(agent, t.get_xfer_descs(items, memory_type(where))))
        idx = list(range(plan.num_descs))
        yield PreparedRead(owned[0], idx, owned[1], idx, plan.num_descs)
    finally:
        for dlist in owned:
            t.release_dlist_handle(dlist)


def timed_read(
    t: NixlTransport, prepared: PreparedRead, timeout_s: float, *, telemetry: bool = False
) -> RawSample:
    """One READ: make transfer + post + poll to DONE + release, timed; ``TimeoutError`` past
    ``timeout_s``, ``RuntimeError`` if it fails. With ``telemetry``, NIXL's descriptor count."""
    deadline = time.monotonic() + timeout_s
    descs = None
    start = time.perf_counter()
    handle = t.make_prepped_xfer(
        "READ", prepared.local_dlist, prepared.local_indices,
        prepared.remote_dlist, prepared.remote_indices,
    )  # fmt: skip
    made = time.perf_counter() - start
    try:
        state = t.transfer(handle)
        posted = time.perf_counter() - start
        while state == "PROC":
            if time.monotonic() > deadline:
                raise TimeoutError(f"raw READ not done in {timeout_s:g}s")
            state = t.check_xfer_state(handle)
        if state != "DONE":
            raise RuntimeError(f"raw READ ended in {state}")
        if telemetry:
            info = t.get_xfer_telemetry(handle)
            descs = None if info is None else info.desc_count
    finally:
        t.release_xfer_handle(handle)
    return RawSample(time.perf_counter() - start, descs, posted, made)
