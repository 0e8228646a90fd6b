"""Scheduler: continuous batching over the block pool, with the connector's scheduler hooks.

Torch-free (it runs where the connector's scheduler half runs). The transfer bookkeeping the
contract asks of an engine (parked loads, delayed frees, load-error rollback) is the kit's
``TransferTracker``; this module keeps the queues, the token budget and preemption.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from kvbridge.config import check_load_failure_policy
from kvbridge.connector.base import ConnectorOutput, KVConnectorMetadata, KVConnectorScheduler
from kvbridge.connector.types import IntegrityError, ScheduledRequest, SchedulerStep
from kvbridge.engine.block_manager import BlockManager
from kvbridge.engine.handover import take_handover
from kvbridge.engine.request import Request, RequestOutput, RequestStatus, TokenLogprobs
from kvbridge.kit.transfers import Admission, LoadOutcome, TransferTracker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    """Batching limits and the load-failure policy of one scheduler."""

    max_num_batched_tokens: int = 512
    max_num_seqs: int = 16
    enable_chunked_prefill: bool = True
    max_model_len: int = 2048
    kv_load_failure_policy: str = "recompute"

    def __post_init__(self) -> None:
        for key in ("max_num_batched_tokens", "max_num_seqs", "max_model_len"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{key}: must be a positive int, got {value!r}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens: {self.max_num_batched_tokens} < max_model_len "
                f"{self.max_model_len}; without chunked prefill a whole prompt must fit one step"
            )
        check_load_failure_policy(self.kv_load_failure_policy)


@dataclass(frozen=True)
class ScheduledChunk:
    """Tokens ``[start_pos, start_pos + len(token_ids))`` of one request, computed this step."""

    request: Request
    token_ids: list[int]
    start_pos: int
    block_ids: list[int]
    sample: bool

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass(frozen=True)
class SchedulerOutput:
    """One step's plan: chunks to compute, the connector's view and its metadata."""

    step: SchedulerStep
    chunks: tuple[ScheduledChunk, ...]
    connector_meta: KVConnectorMetadata | None

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


class WorkerOutput(NamedTuple):
    """What the worker returns after a step: sampled tokens (and the logprobs of those that
    asked for them) and the connector's report."""

    sampled_token_ids: dict[str, int]
    connector_output: ConnectorOutput
    logprobs: Mapping[str, TokenLogprobs] | None = None


class Scheduler:
    """Runs in the scheduler; owns the request queues, the block manager's tables and, through
    a ``TransferTracker``, the connector's scheduler half.

    Per step: running requests first (decodes and prefill chunks; out of blocks -> preempt the
    newest by recompute), then waiting ones (local prefix hit -> ``TransferTracker.match`` ->
    allocate -> ``allocated``), then ``build_step``. An async load parks the request (blocks
    held) until ``finished_recving``; a finished request's blocks are freed when the tracker
    says so.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        connector: KVConnectorScheduler | None = None,
        *,
        vocab_size: int | None = None,
    ) -> None:
        self.config = config
        self.vocab_size = vocab_size  # checks handed-over tokens (None: no check)
        self.block_manager = block_manager
        self.connector = connector
        self.transfers = TransferTracker(
            connector, block_manager.block_size, config.kv_load_failure_policy
        )
        self.requests: dict[str, Request] = {}  # id -> every request not yet released
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_loads_resumed = 0  # parked loads the last update resumed (they can run now)
        self._pending_outputs: list[RequestOutput] = []

    # -- requests -------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a request; one whose prompt is too long ends "rejected" at the next update.
        A first token handed over by the connector is appended now and goes out with the
        request's next output (after its load: a failed load under policy "fail" ends the
        request before any token went out)."""
        if request.request_id in self.requests:
            raise ValueError(f"request_id: {request.request_id!r} is already in use")
        if request.num_prompt_tokens > self.config.max_model_len:
            self.requests[request.request_id] = request
            request.error = (
                f"prompt of {request.num_prompt_tokens} tokens exceeds max_model_len "
                f"{self.config.max_model_len}"
            )
            self._pending_outputs.append(self._finish(request, RequestStatus.FINISHED_IGNORED))
            return
        token = self.transfers.handover(request)
        if token is not None:
            take_handover(request, token, self.config.max_model_len, self.vocab_size)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort_request(self, request_id: str) -> bool:
        """End a live request (any state); ``False`` if unknown or already finished."""
        request = self.requests.get(request_id)
        if request is None or request.is_finished:
            return False
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._pending_outputs.append(self._finish(request, RequestStatus.FINISHED_ABORTED))
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running or self._pending_outputs)

    def has_pending_transfers(self) -> bool:
        """Finished requests whose blocks still wait on the connector."""
        return self.transfers.num_held > 0

    @property
    def num_held_requests(self) -> int:
        return self.transfers.num_held

    def check_integrity(self) -> None:
        """The block pool's and the tracker's invariants, and every block table owned by a
        request in exactly one queue (running, waiting, parked or held) whose state allows it."""
        self.block_manager.check_integrity()
        self.transfers.check_integrity()
        held = [r for r in self.requests.values() if self.transfers.is_held(r.request_id)]
        ids = [r.request_id for r in (*self.running, *self.waiting, *held)]
        if len(set(ids)) != len(ids) or set(ids) != set(self.requests):
            raise IntegrityError(f"queues {sorted(ids)} != live requests {sorted(self.requests)}")
        for rid in self.block_manager.owners() - set(self.requests):
            raise IntegrityError(f"blocks held by {rid}, which is not a live request")
        for request in self.running:
            if request.status is not RequestStatus.RUNNING:
                raise IntegrityError(f"{request} is in the running queue")
            if not self.block_manager.has_blocks(request.request_id):
                raise IntegrityError(f"running {request} holds no blocks")
        for request in self.waiting:
            parked = request.status is RequestStatus.WAITING_FOR_REMOTE_KVS
            if parked != self.transfers.is_loading(request.request_id):
                raise IntegrityError(f"{request}: parked state and load table disagree")
            if request.status is RequestStatus.PREEMPTED and self.block_manager.has_blocks(
                request.request_id
            ):
                raise IntegrityError(f"preempted {request} still holds blocks")
        for request in held:
            if not request.is_finished:
                raise IntegrityError(f"held {request} is not finished")

    # -- schedule -------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []

        def add(request: Request, num_new: int, confirmed: int, resumed: bool) -> None:
            start = request.num_computed_tokens
            blocks = self.block_manager.block_ids(request.request_id)
            end = start + num_new
            tokens = request.all_token_ids[start:end]
            chunks.append(ScheduledChunk(request, tokens, start, blocks, end == request.num_tokens))
            scheduled.append(ScheduledRequest(request, (blocks,), confirmed, num_new, resumed))

        # Phase 1: running requests, oldest first; the newest are preempted when out of blocks.
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = request.num_tokens - request.num_computed_tokens
            if self.config.enable_chunked_prefill:
                num_new = min(num_new, budget)
            elif num_new > budget:
                i += 1
                continue
            total = request.num_computed_tokens + num_new
            while self.block_manager.allocate(request, total) is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            if request.status is not RequestStatus.RUNNING:
                break
            add(request, num_new, request.num_computed_tokens, False)
            budget -= num_new
            i += 1

        # Phase 2: waiting requests in order (none admitted in a step that preempted). Once one
        # finds no room, only those that already hold their blocks (a finished async load) go
        # on: they would otherwise keep the blocks the one in front waits for, and deadlock.
        skipped: list[Request] = []
        no_room = False
        while (
            not preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            request = self.waiting[0]
            holds_blocks = self.block_manager.has_blocks(request.request_id)
            if request.status is RequestStatus.WAITING_FOR_REMOTE_KVS or (
                no_room and not holds_blocks
            ):
                skipped.append(self.waiting.popleft())
                continue
            admitted = self._admit(request, budget)
            if admitted is None:
                if holds_blocks or not any(
                    self.block_manager.has_blocks(r.request_id) for r in self.waiting
                ):
                    break
                no_room = True
                skipped.append(self.waiting.popleft())
                continue
            self.waiting.popleft()
            if admitted.num_new < 0:  # connector still looking, or loading asynchronously
                skipped.append(request)
                continue
            resumed = request.status is RequestStatus.PREEMPTED
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            add(request, admitted.num_new, admitted.confirmed, resumed)
            budget -= admitted.num_new
        self.waiting.extendleft(reversed(skipped))

        step, meta = self.transfers.build_step(scheduled, (r.request_id for r in preempted))
        return SchedulerOutput(step, tuple(chunks), meta)

    def _admit(self, request: Request, budget: int) -> _Admission | None:
        """Lookup, allocate and tell the connector; ``None`` = no room (stop admitting)."""
        rid = request.request_id
        bm = self.block_manager
        resumed_from_load = bm.has_blocks(rid)
        computed = None
        admission = Admission(0, False)
        if resumed_from_load:
            num_local = request.num_computed_tokens
        else:
            computed = bm.get_computed_blocks(request)
            num_local = computed.num_tokens
            matched = self.transfers.match(request, num_local)
            if matched is None:
                return _Admission(-1, 0)
            admission = matched
        ext, load_async = admission
        num_computed = num_local + ext
        num_new = 0 if load_async else request.num_tokens - num_computed
        if self.config.enable_chunked_prefill:
            num_new = min(num_new, budget)
        elif num_new > budget:
            return None
        # An async load gets blocks for every token, so the last token's block exists while
        # the load runs (a P/D read copies the prompt's blocks whole).
        slots = request.num_tokens if load_async else num_computed + num_new
        if bm.allocate(request, slots, computed) is None:
            return None
        self.transfers.allocated(request, (bm.block_ids(rid),), num_local, admission)
        if not resumed_from_load and request.num_preemptions == 0:
            request.num_cached_tokens = num_local
            request.num_external_tokens = self.transfers.num_external_tokens(rid)
        if load_async:
            request.status = RequestStatus.WAITING_FOR_REMOTE_KVS
            return _Admission(-1, 0)
        request.num_computed_tokens = num_computed
        return _Admission(num_new, num_local)

    def _preempt(self, request: Request) -> None:
        logger.debug("preempting %s (recompute)", request.request_id)
        self.block_manager.free(request.request_id)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    # -- results --------------------------------------------------------------------------------
    def update_from_output(
        self, sched: SchedulerOutput, worker: WorkerOutput | None = None
    ) -> list[RequestOutput]:
        """Apply a step's results: connector report, computed tokens, samples, finishes."""
        out = worker.connector_output if worker is not None else ConnectorOutput()
        sampled: Mapping[str, int] = worker.sampled_token_ids if worker is not None else {}
        logprobs = (worker.logprobs if worker is not None else None) or {}
        report = self.transfers.update(out)
        self.num_loads_resumed = sum(1 for o in report.loaded if o.error is None)
        outputs, self._pending_outputs = self._pending_outputs, []
        rolled_back = set()
        for outcome in report.rolled_back:  # this step's loads: recompute from the bad block
            request = self.requests[outcome.request_id]
            if self._apply_load(request, outcome, outputs):
                self.running.remove(request)
            else:
                rolled_back.add(request.request_id)
        for chunk in sched.chunks:
            request = chunk.request
            if request.status is not RequestStatus.RUNNING or request.request_id in rolled_back:
                continue
            request.num_computed_tokens = chunk.start_pos + len(chunk.token_ids)
            self.block_manager.cache_blocks(request, request.num_computed_tokens)
            if not chunk.sample:
                continue
            rid = request.request_id
            request.append_output_token(sampled[rid], logprobs.get(rid))
            status = request.check_stop(self.config.max_model_len)
            if status is None:
                outputs.append(RequestOutput.of(request))
            else:
                self.running.remove(request)
                outputs.append(self._finish(request, status))
        for outcome in report.loaded:  # parked requests: resume (or end)
            request = self.requests[outcome.request_id]
            if self._apply_load(request, outcome, outputs):
                self.waiting.remove(request)
            else:
                request.status = RequestStatus.WAITING
                self.block_manager.cache_blocks(request, request.num_computed_tokens)
        for rid in report.freed:
            self._release(rid)
        if report.invalid_block_ids:
            self.block_manager.invalidate_blocks(report.invalid_block_ids)
        return outputs

    def _apply_load(self, request: Request, outcome: LoadOutcome, outputs: list) -> bool:
        """Take a load's outcome; ``True`` if the request ended (policy fail)."""
        request.num_external_tokens = min(request.num_external_tokens, outcome.num_external_tokens)
        if outcome.error is None:
            request.num_computed_tokens = outcome.num_computed_tokens
            return False
        request.error = outcome.error
        outputs.append(self._finish(request, RequestStatus.FINISHED_ERROR))
        return True

    # -- finishing ------------------------------------------------------------------------------
    def _finish(self, request: Request, status: RequestStatus) -> RequestOutput:
        """End a request already removed from the queues: ``request_finished``, then free/hold."""
        request.status = status
        rid = request.request_id
        finished = self.transfers.finish(request, (self.block_manager.block_ids(rid),))
        if finished.free_now:
            self._release(rid)
        return RequestOutput.of(request, finished.kv_transfer_params)

    def _release(self, rid: str) -> None:
        if self.block_manager.has_blocks(rid):
            self.block_manager.free(rid)
        del self.requests[rid]


class _Admission(NamedTuple):
    num_new: int  # tokens to compute this step; -1: not schedulable this step
    confirmed: int  # tokens whose KV is in the cache before this step's loads
