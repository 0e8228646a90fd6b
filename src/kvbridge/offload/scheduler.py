"""CPUOffloadScheduler: plans GPU<->CPU block copies from the engine's scheduler hooks."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from kvbridge.config import TransferConfig
from kvbridge.connector.base import ConnectorOutput, KVConnectorScheduler, SupportsHMA
from kvbridge.connector.gauges import GaugeValues
from kvbridge.connector.stats import KVConnectorStats
from kvbridge.connector.types import (
    BlockIds,
    FinishedRequest,
    IntegrityError,
    KVCacheEvent,
    KVCacheSpec,
    MatchResult,
    RequestView,
    SchedulerStep,
)
from kvbridge.offload.config import (
    group_windows,
    log_startup_warnings,
    parse_offload_config,
    warn_if_churning,
)
from kvbridge.offload.groups import HitRule
from kvbridge.offload.matcher import HitMatcher, Match
from kvbridge.offload.metadata import CPUOffloadMetadata, CPUOffloadWorkerMetadata, TransferJob
from kvbridge.offload.pool import BlockKey, CPUBlockPool

logger = logging.getLogger(__name__)


class JobKind(StrEnum):
    """Direction of an offload job."""

    LOAD = "load"
    STORE = "store"


@dataclass
class _Job:
    kind: JobKind
    wire: TransferJob
    poisoned: bool = False  # its source blocks were freed while in flight: never index it


@dataclass
class _RequestState:
    planned_blocks: list[int]  # group -> leading blocks already considered for a store
    confirmed_cap: int = 0  # tokens computed once the request's last scheduled step has run
    match: Match | None = None
    jobs: set[int] = field(default_factory=set)  # in-flight job ids
    finished: bool = False
    load_failed: bool = False  # a load of it failed: it recomputes, never asks the tier again
    hit_tokens: int = 0  # tokens its loads in flight bring; counted once they all succeeded


class CPUOffloadScheduler(KVConnectorScheduler, SupportsHMA):
    """Runs in the scheduler; owns the CPU block pool and each request's copy plans.

    - Store: a full block is copied GPU->CPU once confirmed computed (never in the step that
      computes it), unless cached or in flight; decode-phase blocks only with
      ``store_decode_blocks``.
    - Finish: blocks confirmed by the request's last step that no step could store yet are
      flushed. Only such a flush, or a store of the request still in flight, makes
      ``request_finished`` return ``delay_free=True`` (blocks kept until ``finished_sending``);
      otherwise it returns ``(False, None)`` and keeps no state of the request.
    - Load: the longest hit after the local prefix that every group can serve (``HitRule``),
      block aligned and never the last token, is pinned and loaded asynchronously into the
      allocated blocks; the request is reported in ``finished_recving`` once every group's
      load is done, even if it was aborted meanwhile.
    - Groups (HMA): the pool is keyed by (group, block hash); a job moves one group's blocks,
      for that group's layers only; a sliding-window group's null block is never stored or
      loaded into.
    - Pins and reservations are released on completion, failure, preemption or abort.
    """

    def __init__(self, config: TransferConfig, cache_spec: KVCacheSpec) -> None:
        super().__init__(config, cache_spec)
        self.offload = parse_offload_config(config, cache_spec)
        log_startup_warnings(self.offload)
        warn_if_churning(self.offload, cache_spec)
        self.block_size = cache_spec.block_size
        self.num_groups = cache_spec.num_groups
        self.rule = HitRule(group_windows(cache_spec), self.block_size)
        self.pool = CPUBlockPool(self.offload.num_cpu_blocks, self.block_size, self.num_groups)
        self.matcher = HitMatcher(self.pool, self.rule)
        # group -> bytes one block of the group moves (all layers on a single-group cache)
        self._group_bytes = [cache_spec.block_bytes]
        if self.num_groups > 1:
            per_layer = cache_spec.block_bytes_per_layer
            self._group_bytes = [per_layer * len(g.layer_names) for g in cache_spec.groups]
        self._requests: dict[str, _RequestState] = {}
        self._jobs: dict[int, _Job] = {}  # job id -> in-flight job
        self._next_job_id = 0
        self._loads: list[TransferJob] = []  # planned for the next metadata
        self._flushes: list[TransferJob] = []
        self._report_when_done: list[str] = []
        self._stats = KVConnectorStats()
        self._warned_no_hashes = False
        # keys a poisoned store is writing: planned again (not skipped as "in flight") once
        # that store ends, so a resumed or later request still stores them
        self._poisoned_keys: set[BlockKey] = set()

    # -- load planning --------------------------------------------------------------------
    def get_num_new_matched_tokens(
        self, request: RequestView, num_computed_tokens: int
    ) -> MatchResult:
        state = self._requests.get(request.request_id)
        if state is not None:
            self._release_match(state)  # asked again (e.g. allocation failed last step)
            if state.load_failed:  # a retry of a failing load could fail forever: recompute
                return MatchResult(0, False)
        if num_computed_tokens % self.block_size:
            return MatchResult(0, False)
        hashes = request.block_hashes
        if not hashes:
            self._warn_no_hashes(request)
            return MatchResult(0, False)
        start = num_computed_tokens // self.block_size
        end = min(len(hashes), (request.num_tokens - 1) // self.block_size)
        if end <= start:
            return MatchResult(0, False)
        match = self.matcher.find(hashes, start, end)
        if match is None:
            return MatchResult(0, False)
        self._state(request.request_id).match = match
        is_async = self.offload.load_mode == "async"
        return MatchResult((match.end_block - start) * self.block_size, is_async)

    def update_state_after_alloc(
        self, request: RequestView, block_ids: BlockIds, num_external_tokens: int
    ) -> None:
        state = self._requests.get(request.request_id)
        match = state.match if state is not None else None
        if num_external_tokens == 0:
            if state is not None:
                self._release_match(state)
            return
        if state is None or match is None:
            raise RuntimeError(
                f"request {request.request_id}: {num_external_tokens} external tokens allocated "
                "but SimpleCPUOffloadConnector matched none"
            )
        n, rest = divmod(num_external_tokens, self.block_size)
        end = match.start_block + n
        if rest or end > match.end_block or len(block_ids) != self.num_groups:
            raise RuntimeError(
                f"request {request.request_id}: {num_external_tokens} external tokens in "
                f"{len(block_ids)} group(s) do not fit the {match.end_block - match.start_block} "
                f"matched blocks of {self.block_size} tokens in {self.num_groups} group(s)"
            )
        loads = self.matcher.take(request, match, block_ids, end)
        state.match = None
        jobs = [(g, gpu, cpu) for g, (gpu, cpu) in enumerate(loads) if gpu] or [(0, [], [])]
        for g, gpu, cpu in jobs:
            job = self._new_job(JobKind.LOAD, request.request_id, gpu, cpu, g)
            state.jobs.add(job.job_id)
            self._loads.append(job)
        state.hit_tokens += num_external_tokens  # counted once its loads all succeeded

    # -- per step -------------------------------------------------------------------------
    def build_connector_meta(self, step: SchedulerStep) -> CPUOffloadMetadata:
        for req_id in step.preempted_req_ids:
            self._on_preempted(req_id)
        stores = self._flushes
        for sched in step.scheduled:
            state = self._state(sched.request_id)
            if state.jobs:
                self._poison_freed_sources(state, sched.block_ids)
            state.confirmed_cap = max(
                state.confirmed_cap, sched.num_computed_tokens + sched.num_scheduled_tokens
            )
            stores += self._plan_stores(
                state, sched.request, sched.block_ids, sched.num_computed_tokens
            )
        meta = CPUOffloadMetadata(
            loads=self._loads, stores=stores, report_when_done=self._report_when_done
        )
        self._loads, self._flushes, self._report_when_done = [], [], []
        return meta

    def update_connector_output(self, output: ConnectorOutput) -> None:
        meta = output.worker_meta
        if meta is None:
            return
        if not isinstance(meta, CPUOffloadWorkerMetadata):
            raise TypeError(
                "SimpleCPUOffloadConnector: worker metadata must be CPUOffloadWorkerMetadata, "
                f"got {type(meta).__name__}"
            )
        for ids, ok in (
            (meta.completed_stores, True),
            (meta.failed_stores, False),
            (meta.completed_loads, True),
            (meta.failed_loads, False),
        ):
            for job_id in ids:
                self._complete_job(job_id, ok)

    def request_finished(self, request: RequestView, block_ids: list[int]) -> FinishedRequest:
        # Without every group's ids a hybrid cache's finish flushes nothing (it still waits
        # for its in-flight stores).
        return self._finish(request, (block_ids,) if self.num_groups == 1 else None)

    def request_finished_all_groups(
        self, request: RequestView, block_ids: BlockIds
    ) -> FinishedRequest:
        return self._finish(request, block_ids)

    def take_events(self) -> list[KVCacheEvent]:
        return self.pool.take_events()

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        return self._stats.take()

    def get_kv_connector_gauges(self) -> GaugeValues:
        p = self.pool
        return {"num_pinned_cpu_blocks": p.num_pinned, "num_storing_cpu_blocks": p.num_storing}

    @property
    def num_tracked_requests(self) -> int:
        """Requests this half keeps state for (zero once all have finished and drained)."""
        return len(self._requests)

    def has_request_state(self, request_id: str) -> bool:
        """Whether a match, a pin or a store of ``request_id`` is still tracked."""
        return request_id in self._requests

    def check_integrity(self) -> None:
        """Pool invariants, plus: every pin and reservation belongs to a live job or match."""
        self.pool.check_integrity()
        pins = sum(len(m.cpu_block_ids) for s in self._requests.values() if (m := s.match))
        reserved = 0
        for job in self._jobs.values():
            if job.kind is JobKind.LOAD:
                pins += job.wire.num_blocks
            else:
                reserved += job.wire.num_blocks
        storing, pinned = self._own_holds()
        if (reserved, pins) != (storing, pinned):
            raise IntegrityError(
                f"CPUOffloadScheduler integrity: {reserved} blocks in store jobs and {pins} pins "
                f"by matches and loads, but the pool has {storing} storing and {pinned} pinned"
            )
        owned = {j for s in self._requests.values() for j in s.jobs}
        if owned != set(self._jobs):
            raise IntegrityError("CPUOffloadScheduler integrity: jobs and request states disagree")
        if any(len(s.planned_blocks) != self.num_groups for s in self._requests.values()):
            raise IntegrityError("CPUOffloadScheduler integrity: a store cursor per group expected")

    # -- helpers --------------------------------------------------------------------------
    def _own_holds(self) -> tuple[int, int]:
        """The pool's storing blocks and pins that this half's matches and jobs hold."""
        return self.pool.num_storing, self.pool.num_pins

    def _state(self, req_id: str) -> _RequestState:
        state = self._requests.get(req_id)
        if state is None:
            state = self._requests[req_id] = _RequestState([0] * self.num_groups)
        return state

    def _finish(self, request: RequestView, block_ids: BlockIds | None) -> FinishedRequest:
        """End a request: flush what only its last step confirmed, then forget or hold it.

        Why the flush: a request that ends in the step that computed its prompt (max_tokens=1,
        a P/D prefill, an early stop) never has a later step in which those blocks are
        confirmed. Measured on the reference engine (8 prompts of 40 tokens, block size 4,
        GPU cache evicted, each prompt asked again; 2026-12-04): max_tokens=1 gets 320 of 320
        prompt tokens from the CPU tier with the flush, 0 without; the cost is the request's
        GPU blocks held one more engine step. With max_tokens=6 the flush stores nothing and
        delays nothing (320 of 320 either way). vLLM flushes the same blocks and pins them in
        its GPU block pool instead; kvbridge's contract can only keep them by ``delay_free``.
        """
        req_id = request.request_id
        state = self._requests.get(req_id)
        if state is None:
            return FinishedRequest(False, None)
        self._release_match(state)
        if block_ids is not None:
            confirmed = min(request.num_computed_tokens, state.confirmed_cap)
            self._flushes += self._plan_stores(state, request, block_ids, confirmed)
        state.finished = True
        if not state.jobs:
            del self._requests[req_id]
            return FinishedRequest(False, None)
        # An in-flight load needs no delay: the engine keeps a loading request's blocks until
        # it is reported in finished_recving. A store reads the blocks: keep them until done.
        if any(self._jobs[j].kind is JobKind.STORE for j in state.jobs):
            self._report_when_done.append(req_id)
            return FinishedRequest(True, None)
        return FinishedRequest(False, None)

    def _plan_stores(
        self,
        state: _RequestState,
        request: RequestView,
        block_ids: BlockIds,
        confirmed_tokens: int,
    ) -> list[TransferJob]:
        jobs = []
        for g, table in zip(range(self.num_groups), block_ids):
            job = self._plan_store(state, g, request, table, confirmed_tokens)
            if job is not None:
                jobs.append(job)
        return jobs

    def _plan_store(
        self,
        state: _RequestState,
        group: int,
        request: RequestView,
        gpu_block_ids: Sequence[int],
        confirmed_tokens: int,
    ) -> TransferJob | None:
        hashes = request.block_hashes
        end = min(confirmed_tokens // self.block_size, len(hashes), len(gpu_block_ids))
        if not self.offload.store_decode_blocks:
            end = min(end, request.num_prompt_tokens // self.block_size)
        start = state.planned_blocks[group]
        if self._poisoned_keys:  # wait for a poisoned store of these to end, then store them
            end = next(
                (i for i in range(start, end) if (group, hashes[i]) in self._poisoned_keys), end
            )
        if end <= start:
            return None
        state.planned_blocks[group] = end
        positions = [i for i in range(start, end) if not self.rule.is_null(group, gpu_block_ids[i])]
        plan = self.pool.prepare_store([hashes[i] for i in positions], group)
        if plan.num_dropped:
            self._stats.incr("store_drops", plan.num_dropped)
        if plan.num_evicted:
            self._stats.incr("evictions", plan.num_evicted)
        if not plan.block_ids:
            return None
        gpu_ids = [gpu_block_ids[positions[k]] for k in plan.indices]
        job = self._new_job(JobKind.STORE, request.request_id, gpu_ids, plan.block_ids, group)
        state.jobs.add(job.job_id)
        return job

    def _new_job(
        self, kind: JobKind, req_id: str, gpu_ids: list[int], cpu_ids: list[int], group: int
    ) -> TransferJob:
        wire = TransferJob(
            job_id=self._next_job_id,
            req_id=req_id,
            gpu_block_ids=gpu_ids,
            cpu_block_ids=cpu_ids,
            group=group,
        )
        self._next_job_id += 1
        self._jobs[wire.job_id] = _Job(kind, wire)
        return wire

    def _complete_job(self, job_id: int, ok: bool) -> None:
        job = self._jobs.pop(job_id, None)
        if job is None:
            logger.warning("offload job %d reported done but is not in flight", job_id)
            return
        n = job.wire.num_blocks
        nbytes = n * self._group_bytes[job.wire.group]
        if job.kind is JobKind.STORE:
            if job.poisoned:
                self._poisoned_keys.difference_update(
                    k for c in job.wire.cpu_block_ids if (k := self.pool.key_of(c)) is not None
                )
            ok = ok and not job.poisoned
            self.pool.complete_store(job.wire.cpu_block_ids, success=ok)
            self._count("stored" if ok else "failed_store", n, nbytes)
        else:
            self.pool.complete_load(job.wire.cpu_block_ids, success=ok)
            self._count("loaded" if ok else "failed_load", n, nbytes)
        state = self._requests.get(job.wire.req_id)
        if state is None:
            return
        state.jobs.discard(job_id)
        if job.kind is JobKind.LOAD:
            state.load_failed |= not ok
            if not any(self._jobs[j].kind is JobKind.LOAD for j in state.jobs):
                if not state.load_failed:  # tokens loaded, not ones the engine recomputes
                    self._stats.incr("cpu_hit_tokens", state.hit_tokens)
                state.hit_tokens = 0
        if state.finished and not state.jobs:
            del self._requests[job.wire.req_id]

    def _count(self, what: str, blocks: int, nbytes: int) -> None:
        self._stats.incr(f"{what}_blocks", blocks)
        self._stats.incr(f"{what}_bytes", nbytes)

    def _release_match(self, state: _RequestState) -> None:
        if state.match is not None:
            self.matcher.release(state.match)
            state.match = None

    def _poison_freed_sources(self, state: _RequestState, block_ids: BlockIds) -> None:
        """Never index a store whose GPU blocks left the request's table while it copies them
        (a sliding-window group frees the blocks that left the window, and the engine may hand
        them to another request whose forward overwrites them before the copy reads them)."""
        held: dict[int, set[int]] = {}  # group -> the request's blocks, built when needed
        for job_id in state.jobs:
            job = self._jobs[job_id]
            g = job.wire.group
            if job.kind is not JobKind.STORE or job.poisoned or not self.rule.is_sliding(g):
                continue  # a full-attention group frees nothing while the request runs
            if g not in held:
                held[g] = set(block_ids[g]) if g < len(block_ids) else set()
            if not held[g].issuperset(job.wire.gpu_block_ids):
                self._poison(job)

    def _poison(self, job: _Job) -> None:
        """Never index ``job``'s blocks (its source blocks were freed while it copied)."""
        job.poisoned = True
        for cpu_id in job.wire.cpu_block_ids:
            key = self.pool.key_of(cpu_id)
            if key is not None:
                self._poisoned_keys.add(key)

    def _on_preempted(self, req_id: str) -> None:
        state = self._requests.get(req_id)
        if state is None:
            return
        self._release_match(state)
        for job_id in state.jobs:
            job = self._jobs[job_id]
            if job.kind is JobKind.STORE:
                self._poison(job)
            else:
                logger.warning("request %s preempted while its CPU load is in flight", req_id)
        state.planned_blocks = [0] * self.num_groups
        state.confirmed_cap = 0

    def _warn_no_hashes(self, request: RequestView) -> None:
        if self._warned_no_hashes or request.num_tokens < self.block_size:
            return
        self._warned_no_hashes = True
        logger.warning(
            "SimpleCPUOffloadConnector: request %s has no block hashes; the CPU tier needs "
            "prefix caching and stays idle without it",
            request.request_id,
        )
