"""NixlScheduler: the scheduler half of prefill/decode disaggregation (SPEC §3). No torch."""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import msgspec

from kvbridge.config import TransferConfig
from kvbridge.connector.base import (
    ConnectorOutput,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorScheduler,
    SupportsHMA,
)
from kvbridge.connector.gauges import GaugeValues
from kvbridge.connector.types import (
    BlockIds,
    FinishedRequest,
    HandoverToken,
    IntegrityError,
    KVCacheSpec,
    MatchResult,
    RequestView,
    SchedulerStep,
)
from kvbridge.nixl.handshake import NixlAgentMetadata
from kvbridge.nixl.metadata import (
    NixlConnectorMetadata,
    NixlWorkerMetadata,
    RecvSpec,
    RemoteRelease,
    SendSpec,
    blocks_digest,
    prompt_hash,
)
from kvbridge.nixl.params import (
    KVTransferParamsError,
    RemotePrefill,
    TransferParams,
    check_block_count,
    check_distinct_blocks,
    parse_kv_transfer_params,
    remote_prefill_params,
)
from kvbridge.nixl.settings import NixlSettings

logger = logging.getLogger(__name__)


class _Match(NamedTuple):
    remote: RemotePrefill
    num_computed_tokens: int


class NixlScheduler(KVConnectorScheduler, SupportsHMA):
    """Runs in the scheduler; owns which requests load from a remote engine and which hold blocks.

    - Consumer: a request with valid ``do_remote_prefill`` params gets every prompt token but
      the last from the producer, asynchronously; invalid params fall back to local prefill.
      With the producer's first token (``first_token``, which the engine took through
      ``get_handover_token`` and appended), every prompt token comes from the producer.
    - Producer: the params it returns carry the request's first sampled token (and its
      logprobs, when the engine's request keeps them in ``output_logprobs``).
    - Producer: a ``do_remote_decode`` request that finished by length keeps its prompt blocks
      (every group's) until the worker reports it in ``finished_sending`` (consumer done, or
      lease lapsed); one that ended otherwise (aborted, failed) frees them at once: its
      ``kv_transfer_params`` reach no consumer, so nobody would read them.
    - A consumer request that ends while its load is in flight is cancelled and reported in
      ``finished_recving`` once nothing writes into its blocks (the engine holds them until then).
    """

    def __init__(self, config: TransferConfig, cache_spec: KVCacheSpec) -> None:
        super().__init__(config, cache_spec)
        self.settings = NixlSettings.from_config(config)
        self._host = self.settings.side_channel_host
        self._port = self.settings.side_channel_port
        self._matched: dict[str, _Match] = {}  # request id -> matched, awaiting allocation
        self._loaded: set[str] = set()  # remote params consumed: never match again
        self._rejected: set[str] = set()  # invalid params already logged
        self._pending_recv: dict[str, RecvSpec] = {}  # planned, not yet shipped
        self._recving: set[str] = set()  # shipped, awaiting finished_recving
        self._pending_send: dict[str, SendSpec] = {}
        self._sending: dict[str, int] = {}  # shipped, awaiting finished_sending -> its blocks
        self._aborts: dict[str, bool] = {}  # request id -> report it in finished_recving
        self._releases: list[RemoteRelease] = []
        self.load_failures: dict[str, str] = {}  # request id -> why its load failed

    # -- consumer -------------------------------------------------------------------------------
    def get_num_new_matched_tokens(
        self, request: RequestView, num_computed_tokens: int
    ) -> MatchResult:
        rid = request.request_id
        if rid in self._loaded or rid in self._rejected:
            return MatchResult(0, False)
        remote = self._remote_prefill(request)
        if remote is None:
            return MatchResult(0, False)
        count = request.num_prompt_tokens - num_computed_tokens
        if not _seeded(request, remote):
            count -= 1  # the last prompt token is computed here, for the first token's logits
        self._matched[rid] = _Match(remote, num_computed_tokens)
        if count <= 0:
            return MatchResult(0, False)
        return MatchResult(count, True)

    def update_state_after_alloc(
        self, request: RequestView, block_ids: BlockIds, num_external_tokens: int
    ) -> None:
        rid = request.request_id
        match = self._matched.pop(rid, None)
        if match is None:
            return
        self._loaded.add(rid)
        remote = match.remote
        if num_external_tokens == 0:
            self._releases.append(_release(remote))
            return
        bs = self.cache_spec.block_size
        first, end = match.num_computed_tokens // bs, -(-request.num_prompt_tokens // bs)
        fail = None
        short = [len(ids) for ids in block_ids if len(ids) < end]
        if len(block_ids) != len(remote.remote_block_ids):
            fail = f"{len(block_ids)} local KV cache groups, {len(remote.remote_block_ids)} remote"
        elif short:
            fail = f"only {short[0]} blocks allocated, the prompt needs {end}"
        self._pending_recv[rid] = RecvSpec(
            request_id=rid,
            local_block_ids=tuple(list(ids[first:end]) for ids in block_ids),
            remote_engine_id=remote.remote_engine_id,
            remote_host=remote.remote_host,
            remote_port=remote.remote_port,
            remote_block_ids=tuple(list(ids[first:end]) for ids in remote.remote_block_ids),
            remote_request_id=remote.remote_request_id,
            fail_reason=fail,
            prompt_hash=prompt_hash(request.prompt_token_ids),
            remote_blocks_digest=blocks_digest(remote.remote_block_ids),
        )

    def get_handover_token(self, request: RequestView) -> HandoverToken | None:
        """The producer's first token, when the params are valid remote-prefill params that
        carry one (``SupportsHandover``)."""
        if request.request_id in self._loaded or request.num_tokens != request.num_prompt_tokens:
            return None
        remote = self._remote_prefill(request)
        token = None if remote is None else remote.first_token
        if token is None:
            return None
        if token.prompt_hash != prompt_hash(request.prompt_token_ids):
            logger.warning(
                "request %s: kv_transfer_params.first_token follows another prompt (or names "
                "none); not taken",
                request.request_id,
            )
            return None
        return token.handover()

    def _remote_prefill(self, request: RequestView) -> RemotePrefill | None:
        params = self._params(request)
        if params is None or params.remote_prefill is None:
            return None
        remote = params.remote_prefill
        try:
            if not self.config.is_consumer:
                raise KVTransferParamsError(
                    f"kv_transfer_params.do_remote_prefill: this engine's kv_role is "
                    f"{self.config.kv_role}, not a consumer"
                )
            if remote.tp_size != self.cache_spec.world_size:
                raise KVTransferParamsError(
                    f"kv_transfer_params.tp_size: producer has {remote.tp_size} workers, this "
                    f"engine {self.cache_spec.world_size}"
                )
            check_block_count(
                remote,
                request.num_prompt_tokens,
                self.cache_spec.block_size,
                self.cache_spec.num_groups,
            )
            check_distinct_blocks(
                remote, [g.attention == "sliding_window" for g in self.cache_spec.groups]
            )
        except KVTransferParamsError as e:
            self._reject(request.request_id, e)
            return None
        if not remote.remote_request_id:
            remote = msgspec.structs.replace(remote, remote_request_id=request.request_id)
        return remote

    def _params(self, request: RequestView) -> TransferParams | None:
        try:
            return parse_kv_transfer_params(request.kv_transfer_params)
        except KVTransferParamsError as e:
            self._reject(request.request_id, e)
            return None

    def _reject(self, rid: str, error: KVTransferParamsError) -> None:
        if rid not in self._rejected:
            logger.warning("request %s: %s; computing it locally", rid, error)
            self._rejected.add(rid)

    # -- every step -----------------------------------------------------------------------------
    def build_connector_meta(self, step: SchedulerStep) -> KVConnectorMetadata:
        for rid in step.preempted_req_ids & self._recving:
            logger.error("request %s preempted while loading remote KV; cancelling the load", rid)
            self._recving.discard(rid)
            self._aborts[rid] = False
        meta = NixlConnectorMetadata(
            reqs_to_recv=self._pending_recv,
            reqs_to_send=self._pending_send,
            reqs_aborted=self._aborts,
            reqs_to_release=self._releases,
        )
        self._recving.update(self._pending_recv)
        self._sending.update((rid, spec.num_blocks) for rid, spec in self._pending_send.items())
        self._pending_recv, self._pending_send, self._aborts, self._releases = {}, {}, {}, []
        return meta

    def set_xfer_handshake_metadata(
        self, metadata: dict[int, KVConnectorHandshakeMetadata]
    ) -> None:
        """Learn rank 0's side channel address before any request can finish."""
        first = metadata.get(0)
        if isinstance(first, NixlAgentMetadata) and first.side_channel_port:
            self._host, self._port = first.side_channel_host, first.side_channel_port

    def update_connector_output(self, output: ConnectorOutput) -> None:
        self._recving -= output.finished_recving
        for rid in output.finished_sending:
            self._sending.pop(rid, None)
        meta = output.worker_meta
        if not isinstance(meta, NixlWorkerMetadata):
            return
        if meta.side_channel_port is not None and meta.side_channel_host is not None:
            self._host, self._port = meta.side_channel_host, meta.side_channel_port
        self.load_failures.update(meta.load_failures)

    # -- end of a request -----------------------------------------------------------------------
    def request_finished(self, request: RequestView, block_ids: list[int]) -> FinishedRequest:
        return self.request_finished_all_groups(request, (block_ids,))

    def request_finished_all_groups(
        self, request: RequestView, block_ids: BlockIds
    ) -> FinishedRequest:
        rid = request.request_id
        match = self._matched.pop(rid, None)
        self._loaded.discard(rid)
        self._rejected.discard(rid)
        self.load_failures.pop(rid, None)
        if match is not None:  # matched, never allocated
            self._releases.append(_release(match.remote))
        pending = self._pending_recv.pop(rid, None)
        if pending is not None:  # planned, never shipped: nothing writes into its blocks yet
            self._releases.append(_release_spec(pending))
            return FinishedRequest(False, None)
        if rid in self._recving:  # in flight: the engine holds the blocks until finished_recving
            self._aborts[rid] = True
            return FinishedRequest(False, None)
        return self._finish_producer(request, block_ids)

    def _finish_producer(self, request: RequestView, block_ids: BlockIds) -> FinishedRequest:
        rid = request.request_id
        params = self._params(request)
        self._rejected.discard(rid)
        if params is None or not params.do_remote_decode:
            return FinishedRequest(False, None)
        if not self.config.is_producer:
            logger.warning(
                "request %s asks for remote decode but kv_role is %s; not holding",
                rid,
                self.config.kv_role,
            )
            return FinishedRequest(False, None)
        # None: the engine does not say (nor does a request type older than the field)
        reason = getattr(request, "finish_reason", None)
        if reason is not None and reason != "length":
            logger.info("request %s ended (%s): no consumer will read it; not holding", rid, reason)
            return FinishedRequest(False, None)
        if request.num_computed_tokens < request.num_prompt_tokens:
            logger.info("request %s ended before its prompt was computed; not holding", rid)
            return FinishedRequest(False, None)
        n = -(-request.num_prompt_tokens // self.cache_spec.block_size)
        if len(block_ids) != self.cache_spec.num_groups or any(len(g) < n for g in block_ids):
            logger.warning(
                "request %s: %s blocks for a %d-block prompt; not holding",
                rid,
                [len(g) for g in block_ids],
                n,
            )
            return FinishedRequest(False, None)
        if self._port == 0:
            raise RuntimeError(
                f"NixlScheduler: request {rid} asks for remote decode, but side_channel_port is 0 "
                "and no worker has said which port it bound; call set_xfer_handshake_metadata "
                "with the workers' get_handshake_metadata() before the first request"
            )
        held = tuple(list(g[:n]) for g in block_ids)
        hashed = prompt_hash(request.prompt_token_ids)
        self._pending_send[rid] = SendSpec(
            request_id=rid,
            num_blocks=n * len(held),
            lease_duration_s=self.settings.kv_lease_duration_s,
            abort_timeout_s=self.settings.abort_timeout_s,
            block_ids=held,
            prompt_hash=hashed,
        )
        params_out: dict[str, Any] = remote_prefill_params(
            engine_id=self.config.engine_id,
            host=self._host,
            port=self._port,
            block_ids=held,
            request_id=rid,
            tp_size=self.cache_spec.world_size,
            first_token=_first_token(request),
            prompt_hash=hashed,
        )
        return FinishedRequest(True, params_out)

    # -- introspection --------------------------------------------------------------------------
    def get_kv_connector_gauges(self) -> GaugeValues:
        held = sum(s.num_blocks for s in self._pending_send.values()) + sum(self._sending.values())
        return {"num_blocks_held_for_remote_decode": held}

    @property
    def num_held_for_remote_decode(self) -> int:
        return len(self._pending_send) + len(self._sending)

    @property
    def num_waiting_for_remote_kv(self) -> int:
        return len(self._pending_recv) + len(self._recving)

    def has_request_state(self, request_id: str) -> bool:
        """Whether any per-request state is left (for leak checks)."""
        return any(
            request_id in s
            for s in (
                self._matched,
                self._loaded,
                self._rejected,
                self._pending_recv,
                self._recving,
                self._pending_send,
                self._sending,
                self._aborts,
                self.load_failures,
            )
        )

    def check_integrity(self) -> None:
        if set(self._pending_recv) & self._recving:
            raise IntegrityError("NixlScheduler: a load is both planned and in flight")
        if self._pending_send.keys() & self._sending.keys():
            raise IntegrityError("NixlScheduler: a hold is both planned and shipped")


def _seeded(request: RequestView, remote: RemotePrefill) -> bool:
    """Whether the engine appended the producer's first token to the request."""
    token = remote.first_token
    n = request.num_prompt_tokens
    return (
        token is not None and request.num_tokens > n and request.all_token_ids[n] == token.token_id
    )


def _first_token(request: RequestView) -> HandoverToken | None:
    """A finished producer request's first output token, with its logprobs if the request
    kept them (kvbridge's engine: ``output_logprobs``; vLLM's scheduler-side request: none)."""
    if request.num_tokens <= request.num_prompt_tokens:
        return None
    token = request.all_token_ids[request.num_prompt_tokens]
    kept = getattr(request, "output_logprobs", None)
    first = kept[0] if kept else None
    if first is None or getattr(first, "token_id", None) != token:
        return HandoverToken(token)
    top = tuple((int(t), float(lp)) for t, lp in first.top)
    return HandoverToken(token, float(first.logprob), int(first.rank), top)


def _release(remote: RemotePrefill) -> RemoteRelease:
    return RemoteRelease(
        remote_engine_id=remote.remote_engine_id,
        remote_host=remote.remote_host,
        remote_port=remote.remote_port,
        remote_request_id=remote.remote_request_id,
    )


def _release_spec(spec: RecvSpec) -> RemoteRelease:
    return RemoteRelease(
        remote_engine_id=spec.remote_engine_id,
        remote_host=spec.remote_host,
        remote_port=spec.remote_port,
        remote_request_id=spec.remote_request_id,
    )
