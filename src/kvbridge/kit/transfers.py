"""TransferTracker: the engine's half of the connector contract, for any engine's scheduler.

An engine keeps its own queues, block pool and model; what it owes the connector on top of
them lives here, torch-free (SPEC §1):

- an async load parks its request, blocks held, until the id comes back in ``finished_recving``;
- a finished request whose connector answered ``delay_free`` keeps its blocks until the id
  comes back in ``finished_sending``; one finished while its load was in flight keeps them until
  ``finished_recving`` (a late write must not land in a reused block);
- load-error block ids roll a load back to its first failed block (policy ``recompute``) or end
  the request with an error (policy ``fail``); the request's external tokens shrink to the ones
  that arrived;
- ``finished_req_ids`` and step ids of each ``SchedulerStep`` are kept for the engine.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from kvbridge.config import check_load_failure_policy
from kvbridge.connector.base import (
    ConnectorOutput,
    KVConnectorMetadata,
    KVConnectorScheduler,
    SupportsHMA,
)
from kvbridge.connector.types import (
    BlockIds,
    FinishedRequest,
    HandoverToken,
    IntegrityError,
    RequestView,
    ScheduledRequest,
    SchedulerStep,
    SupportsHandover,
)

logger = logging.getLogger(__name__)


class ConnectorContractError(RuntimeError):
    """A connector answered outside the contract (e.g. offered the prompt's last token)."""


class Admission(NamedTuple):
    """The connector's part of a request's admission (``TransferTracker.match``)."""

    num_external_tokens: int  # tokens after the local prefix hit that the connector supplies
    load_async: bool  # they arrive over later steps: allocate every token's block and park


class LoadOutcome(NamedTuple):
    """How a load ended. ``error`` set: policy ``fail`` and the load failed, end the request."""

    request_id: str
    num_computed_tokens: int  # tokens with valid KV: the load's end or its first failed token
    num_external_tokens: int  # the request's external tokens, less those that failed to arrive
    error: str | None


class Finished(NamedTuple):
    """Answer of ``TransferTracker.finish``."""

    free_now: bool  # False: the blocks come back in a later ``TransferReport.freed``
    kv_transfer_params: dict[str, Any] | None  # for the client, with the final output


class TransferReport(NamedTuple):
    """What one worker output means for the engine's requests (``TransferTracker.update``)."""

    rolled_back: tuple[LoadOutcome, ...]  # this step's same-step loads with failed blocks
    loaded: tuple[LoadOutcome, ...]  # parked requests whose load finished: resume (or end)
    freed: tuple[str, ...]  # finished requests whose blocks may be freed now
    invalid_block_ids: frozenset[int]  # drop these from the prefix cache


@dataclass(frozen=True)
class _Load:
    start: int  # tokens computed locally before the load
    end: int  # tokens computed once the load is done
    block_ids: BlockIds  # the blocks it writes


@dataclass
class _Hold:
    wait_send: bool  # delay_free: until the id is in finished_sending
    wait_recv: bool  # finished mid-load: until the id is in finished_recving


class TransferTracker:
    """Runs in the scheduler; owns the transfer state of each request: parked loads, this
    step's synchronous loads, holds of finished requests and external-token counts.

    Per request: ``match`` -> (engine allocates) -> ``allocated`` -> ``build_step`` each step ->
    ``update`` with each worker output -> ``finish`` once -> free when ``free_now`` or when the
    id is in a report's ``freed``. Works without a connector (``connector=None``): nothing
    matches, nothing is held.
    """

    def __init__(
        self,
        connector: KVConnectorScheduler | None,
        block_size: int,
        kv_load_failure_policy: str = "recompute",
    ) -> None:
        check_load_failure_policy(kv_load_failure_policy)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size: must be a positive int, got {block_size!r}")
        self.connector = connector
        self.block_size = block_size
        self.policy = kv_load_failure_policy
        self._parked: dict[str, _Load] = {}  # id -> its async load in flight
        self._sync: dict[str, _Load] = {}  # id -> its load in the step being built/run
        self._held: dict[str, _Hold] = {}  # finished id -> what its blocks wait for
        self._external: dict[str, int] = {}  # id -> external tokens (first admission)
        self._invalid: set[int] = set()  # failed blocks not yet matched to a parked load
        self._finished_ids: set[str] = set()
        self._step_id = 0

    # -- admission ------------------------------------------------------------------------------
    def handover(self, request: RequestView) -> HandoverToken | None:
        """A new request's first token from the connector (``SupportsHandover``), or ``None``.
        An engine that appends it (as the first output token) does so before ``match``."""
        if isinstance(self.connector, SupportsHandover):
            return self.connector.get_handover_token(request)
        return None

    def match(self, request: RequestView, num_local_tokens: int) -> Admission | None:
        """Ask the connector what it adds to ``num_local_tokens`` (the local prefix hit);
        ``None``: it is still looking, leave the request waiting and ask again next step."""
        if self.connector is None:
            return Admission(0, False)
        num, load_async = self.connector.get_num_new_matched_tokens(request, num_local_tokens)
        if num is None:
            return None
        if not 0 <= num <= request.num_tokens - 1 - num_local_tokens:
            raise ConnectorContractError(
                f"{type(self.connector).__name__}.get_num_new_matched_tokens offered {num} "
                f"tokens for {request.request_id} ({request.num_tokens} tokens, "
                f"{num_local_tokens} computed locally); it must leave the last token to compute"
            )
        return Admission(num, bool(load_async and num))

    def allocated(
        self,
        request: RequestView,
        block_ids: BlockIds,
        num_local_tokens: int,
        admission: Admission,
    ) -> None:
        """The engine allocated ``block_ids`` (all the request's blocks, every group) after
        ``match`` (or to resume a finished async load, with ``Admission(0, False)``)."""
        rid = request.request_id
        ext = admission.num_external_tokens
        if self.connector is not None:
            self.connector.update_state_after_alloc(request, block_ids, ext)
        self._external.setdefault(rid, ext)
        if ext:
            load = _Load(num_local_tokens, num_local_tokens + ext, block_ids)
            (self._parked if admission.load_async else self._sync)[rid] = load

    # -- steps ----------------------------------------------------------------------------------
    def build_step(
        self, scheduled: Sequence[ScheduledRequest], preempted_req_ids: Iterable[str] = ()
    ) -> tuple[SchedulerStep, KVConnectorMetadata | None]:
        """This step's ``SchedulerStep`` (with the requests finished since the last one) and
        the connector's metadata for the workers (``None`` without a connector)."""
        preempted = frozenset(preempted_req_ids)
        for rid in preempted:
            self._sync.pop(rid, None)
        step = SchedulerStep(
            self._step_id, tuple(scheduled), frozenset(self._finished_ids), preempted
        )
        self._step_id += 1
        self._finished_ids = set()
        meta = self.connector.build_connector_meta(step) if self.connector is not None else None
        return step, meta

    def update(self, output: ConnectorOutput) -> TransferReport:
        """Apply one step's worker output (call once per step, before applying its tokens).

        A ``rolled_back`` request recomputes from its ``num_computed_tokens`` (skip this step's
        tokens for it) unless ``error`` says to end it; a ``loaded`` one resumes from its
        ``num_computed_tokens`` (or ends).
        """
        if self.connector is not None:
            self.connector.update_connector_output(output)
        self._invalid |= output.invalid_block_ids
        rolled_back = []
        for rid, load in self._sync.items():
            outcome = self._outcome(rid, load)
            if outcome.num_computed_tokens < load.end:
                rolled_back.append(outcome)
        self._sync.clear()
        loaded: list[LoadOutcome] = []
        freed: list[str] = []
        for rid in sorted(output.finished_recving):
            parked_load = self._parked.pop(rid, None)
            if parked_load is not None:
                loaded.append(self._outcome(rid, parked_load))
            elif self._release(rid, recv=True):
                freed.append(rid)
        for rid in sorted(output.finished_sending):
            if self._release(rid, send=True):
                freed.append(rid)
        self._invalid &= {b for p in self._parked.values() for group in p.block_ids for b in group}
        return TransferReport(
            tuple(rolled_back), tuple(loaded), tuple(freed), output.invalid_block_ids
        )

    def finish(self, request: RequestView, block_ids: BlockIds) -> Finished:
        """The request ended (any reason, blocks or none): ``request_finished`` once, and
        whether its blocks may be freed now. Its id goes to the next step's finished ids."""
        rid = request.request_id
        result = FinishedRequest(False, None)
        if self.connector is not None:
            result = _request_finished(self.connector, request, block_ids)
        self._finished_ids.add(rid)
        self._sync.pop(rid, None)
        self._external.pop(rid, None)
        loading = self._parked.pop(rid, None)
        hold = _Hold(wait_send=result.delay_free, wait_recv=loading is not None)
        if hold.wait_send or hold.wait_recv:
            self._held[rid] = hold
        return Finished(rid not in self._held, result.kv_transfer_params)

    # -- queries --------------------------------------------------------------------------------
    def is_loading(self, request_id: str) -> bool:
        """Whether the request is parked on an async load."""
        return request_id in self._parked

    def is_held(self, request_id: str) -> bool:
        """Whether the request finished and its blocks still wait on the connector."""
        return request_id in self._held

    @property
    def num_held(self) -> int:
        return len(self._held)

    def num_external_tokens(self, request_id: str) -> int:
        """Tokens the connector supplied at the request's first admission, less failed ones."""
        return self._external.get(request_id, 0)

    def check_integrity(self) -> None:
        """Raise ``IntegrityError`` if a request is both parked, loading this step or held."""
        for a, b in (
            (self._parked, self._sync),
            (self._parked, self._held),
            (self._sync, self._held),
        ):
            both = sorted(set(a) & set(b))
            if both:
                raise IntegrityError(f"TransferTracker: {both} in two states at once")

    # -- internals ------------------------------------------------------------------------------
    def _outcome(self, rid: str, load: _Load) -> LoadOutcome:
        bad = self._first_bad_token(load)
        if bad is None:
            return LoadOutcome(rid, load.end, self.num_external_tokens(rid), None)
        ext = min(self.num_external_tokens(rid), max(0, bad - load.start))
        self._external[rid] = ext
        logger.warning("KV load failed for %s from token %d (policy %s)", rid, bad, self.policy)
        error = None
        if self.policy == "fail":
            error = f"KV load failed from token {bad} (kv_load_failure_policy=fail)"
        return LoadOutcome(rid, bad, ext, error)

    def _first_bad_token(self, load: _Load) -> int | None:
        """First token of the first block in ``[start, end)`` whose load failed, any group."""
        bs = self.block_size
        first: int | None = None
        for table in load.block_ids:
            for i in range(load.start // bs, min(len(table), -(-load.end // bs))):
                if table[i] in self._invalid:
                    token = max(load.start, i * bs)
                    first = token if first is None else min(first, token)
                    break
        return first

    def _release(self, rid: str, *, send: bool = False, recv: bool = False) -> bool:
        """Clear what a held request waited for; ``True`` once it waits for nothing."""
        hold = self._held.get(rid)
        if hold is None or not ((send and hold.wait_send) or (recv and hold.wait_recv)):
            what = "finished_sending" if send else "finished_recving"
            logger.debug("%s for %s, which holds no blocks for it", what, rid)
            return False
        hold.wait_send &= not send
        hold.wait_recv &= not recv
        if hold.wait_send or hold.wait_recv:
            return False
        del self._held[rid]
        return True


def _request_finished(
    connector: KVConnectorScheduler, request: RequestView, block_ids: BlockIds
) -> FinishedRequest:
    """``request_finished`` (one group) or ``request_finished_all_groups`` (HMA connectors)."""
    if len(block_ids) <= 1:
        return connector.request_finished(request, block_ids[0] if block_ids else [])
    if not isinstance(connector, SupportsHMA):
        raise ConnectorContractError(
            f"{type(connector).__name__} does not support HMA but the engine finished "
            f"{request.request_id} with {len(block_ids)} block groups"
        )
    return connector.request_finished_all_groups(request, block_ids)
