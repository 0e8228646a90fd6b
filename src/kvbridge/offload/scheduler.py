"""CPUOffloadScheduler: plans GPU<->CPU block copies from the engine's scheduler hooks."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from kvbridge.config import TransferConfig
from kvbridge.connector.base import ConnectorOutput, KVConnectorScheduler
from kvbridge.connector.stats import KVConnectorStats
from kvbridge.connector.types import (
    BlockIds,
    FinishedRequest,
    KVCacheEvent,
    KVCacheSpec,
    MatchResult,
    RequestView,
    SchedulerStep,
)
from kvbridge.offload.config import log_startup_warnings, parse_offload_config, warn_if_churning
from kvbridge.offload.metadata import CPUOffloadMetadata, CPUOffloadWorkerMetadata, TransferJob
from kvbridge.offload.pool import CPUBlockPool

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
class _Match:
    start_block: int  # first block after the locally computed prefix
    cpu_block_ids: list[int]  # pinned until allocated, or released


@dataclass
class _RequestState:
    planned_blocks: int = 0  # leading blocks already considered for a store
    confirmed_cap: int = 0  # tokens computed once the request's last scheduled step has run
    match: _Match | None = None
    jobs: set[int] = field(default_factory=set)  # in-flight job ids
    finished: bool = False


class CPUOffloadScheduler(KVConnectorScheduler):
    """Runs in the scheduler; owns the CPU block pool and each request's copy plans.

    - Store: a full block is copied GPU->CPU once confirmed computed (never in the step that
      computes it), unless cached or in flight; decode-phase blocks only with
      ``store_decode_blocks``; a finished request flushes its confirmed prompt blocks and keeps
      its GPU blocks (``delay_free``) until every store of it is done.
    - Load: the longest run of consecutive CPU hits after the local prefix, block aligned and
      never the last token, is pinned and loaded asynchronously into the allocated blocks; the
      request is reported in ``finished_recving`` when done, even if it was aborted meanwhile.
    - Pins and reservations are released on completion, failure, preemption or abort.
    """

    def __init__(self, config: TransferConfig, cache_spec: KVCacheSpec) -> None:
        super().__init__(config, cache_spec)
        self.offload = parse_offload_config(config, cache_spec)
        log_startup_warnings(self.offload)
        warn_if_churning(self.offload, cache_spec)
        self.block_size = cache_spec.block_size
        self.pool = CPUBlockPool(self.offload.num_cpu_blocks, self.block_size)
        self._requests: dict[str, _RequestState] = {}
        self._jobs: dict[int, _Job] = {}  # job id -> in-flight job
        self._next_job_id = 0
        self._loads: list[TransferJob] = []  # planned for the next metadata
        self._flushes: list[TransferJob] = []
        self._report_when_done: list[str] = []
        self._stats = KVConnectorStats()
        self._warned_no_hashes = False

    # -- load planning --------------------------------------------------------------------
    def get_num_new_matched_tokens(
        self, request: RequestView, num_computed_tokens: int
    ) -> MatchResult:
        state = self._requests.get(request.request_id)
        if state is not None:
            self._release_match(state)  # asked again (e.g. allocation failed last step)
        if num_computed_tokens % self.block_size:
            return MatchResult(0, False)
        hashes = request.block_hashes
        if not hashes:
            self._warn_no_hashes(request)
            return MatchResult(0, False)
        start = num_computed_tokens // self.block_size
        end = min(len(hashes), (request.num_tokens - 1) // self.block_size)
        hits = self.pool.lookup(hashes[start:end]) if end > start else 0
        if hits == 0:
            return MatchResult(0, False)
        cpu_ids = self.pool.prepare_load(hashes[start : start + hits])
        state = self._requests.setdefault(request.request_id, _RequestState())
        state.match = _Match(start, cpu_ids)
        return MatchResult(hits * self.block_size, True)

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
        gpu_ids = block_ids[0][match.start_block : match.start_block + n]
        if rest or n > len(match.cpu_block_ids) or len(gpu_ids) < n:
            raise RuntimeError(
                f"request {request.request_id}: {num_external_tokens} external tokens do not fit "
                f"the {len(match.cpu_block_ids)} matched blocks of {self.block_size} tokens"
            )
        state.match = None
        if n < len(match.cpu_block_ids):
            self.pool.complete_load(match.cpu_block_ids[n:], success=False)
        job = self._new_job(JobKind.LOAD, request.request_id, gpu_ids, match.cpu_block_ids[:n])
        state.jobs.add(job.job_id)
        self._loads.append(job)
        self._stats.incr("cpu_hit_tokens", num_external_tokens)

    # -- per step -------------------------------------------------------------------------
    def build_connector_meta(self, step: SchedulerStep) -> CPUOffloadMetadata:
        for req_id in step.preempted_req_ids:
            self._on_preempted(req_id)
        stores = self._flushes
        for sched in step.scheduled:
            state = self._requests.setdefault(sched.request_id, _RequestState())
            state.confirmed_cap = max(
                state.confirmed_cap, sched.num_computed_tokens + sched.num_scheduled_tokens
            )
            job = self._plan_store(
                state, sched.request, sched.block_ids[0], sched.num_computed_tokens
            )
            if job is not None:
                stores.append(job)
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
        req_id = request.request_id
        state = self._requests.get(req_id)
        if state is None:
            return FinishedRequest(False, None)
        self._release_match(state)
        confirmed = min(request.num_computed_tokens, state.confirmed_cap)
        job = self._plan_store(state, request, block_ids, confirmed)
        if job is not None:
            self._flushes.append(job)
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

    def take_events(self) -> list[KVCacheEvent]:
        return self.pool.take_events()

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        return self._stats.take()

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
        if reserved != self.pool.num_storing:
            raise RuntimeError(
                f"CPUOffloadScheduler integrity: {reserved} blocks in store jobs, "
                f"pool has {self.pool.num_storing} storing"
            )
        held = self.pool.num_pins
        if pins != held:
            raise RuntimeError(
                f"CPUOffloadScheduler integrity: {pins} pins by matches and loads, "
                f"pool holds {held}"
            )
        owned = {j for s in self._requests.values() for j in s.jobs}
        if owned != set(self._jobs):
            raise RuntimeError("CPUOffloadScheduler integrity: jobs and request states disagree")

    # -- helpers --------------------------------------------------------------------------
    def _plan_store(
        self,
        state: _RequestState,
        request: RequestView,
        gpu_block_ids: Sequence[int],
        confirmed_tokens: int,
    ) -> TransferJob | None:
        hashes = request.block_hashes
        end = min(confirmed_tokens // self.block_size, len(hashes), len(gpu_block_ids))
        if not self.offload.store_decode_blocks:
            end = min(end, request.num_prompt_tokens // self.block_size)
        start = state.planned_blocks
        if end <= start:
            return None
        state.planned_blocks = end
        plan = self.pool.prepare_store(hashes[start:end])
        if plan.num_dropped:
            self._stats.incr("store_drops", plan.num_dropped)
        if plan.num_evicted:
            self._stats.incr("evictions", plan.num_evicted)
        if not plan.block_ids:
            return None
        gpu_ids = [gpu_block_ids[start + i] for i in plan.indices]
        job = self._new_job(JobKind.STORE, request.request_id, gpu_ids, plan.block_ids)
        state.jobs.add(job.job_id)
        return job

    def _new_job(
        self, kind: JobKind, req_id: str, gpu_ids: list[int], cpu_ids: list[int]
    ) -> TransferJob:
        wire = TransferJob(
            job_id=self._next_job_id, req_id=req_id, gpu_block_ids=gpu_ids, cpu_block_ids=cpu_ids
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
        nbytes = n * self.cache_spec.block_bytes
        if job.kind is JobKind.STORE:
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
        if state.finished and not state.jobs:
            del self._requests[job.wire.req_id]

    def _count(self, what: str, blocks: int, nbytes: int) -> None:
        self._stats.incr(f"{what}_blocks", blocks)
        self._stats.incr(f"{what}_bytes", nbytes)

    def _release_match(self, state: _RequestState) -> None:
        if state.match is not None:
            self.pool.complete_load(state.match.cpu_block_ids, success=False)
            state.match = None

    def _on_preempted(self, req_id: str) -> None:
        state = self._requests.get(req_id)
        if state is None:
            return
        self._release_match(state)
        for job_id in state.jobs:
            job = self._jobs[job_id]
            if job.kind is JobKind.STORE:
                job.poisoned = True
            else:
                logger.warning("request %s preempted while its CPU load is in flight", req_id)
        state.planned_blocks = 0
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
