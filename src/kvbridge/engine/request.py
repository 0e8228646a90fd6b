"""Request: one generation request as the scheduler tracks it, and its output. Torch-free."""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from kvbridge.engine.sampling import SamplingParams
    from kvbridge.kit.hashing import BlockHasher


class RequestStatus(StrEnum):
    """Where a request is in its life; finished states carry a finish reason."""

    WAITING = "waiting"
    # Blocks allocated; an async connector load fills them across steps.
    WAITING_FOR_REMOTE_KVS = "waiting_for_remote_kvs"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH_CAPPED = "finished_length_capped"
    FINISHED_ABORTED = "finished_aborted"
    # Rejected: can never be scheduled (e.g. longer than the KV cache).
    FINISHED_IGNORED = "finished_ignored"
    # KV load failed under ``kv_load_failure_policy="fail"``.
    FINISHED_ERROR = "finished_error"

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS: dict[RequestStatus, str] = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_IGNORED: "rejected",
    RequestStatus.FINISHED_ERROR: "error",
}


class TokenLogprobs(NamedTuple):
    """Log-probabilities at one generated position (see ``sampling.compute_logprobs``)."""

    token_id: int  # the sampled token
    logprob: float  # its log-probability
    rank: int  # 1 + how many tokens were more likely
    top: tuple[tuple[int, float], ...]  # (token id, logprob) of the most likely, most likely first


class Request:
    """A prompt, its generated tokens and its scheduling state; satisfies ``RequestView``.

    ``block_hashes`` covers every full block of ``all_token_ids`` and grows as tokens are
    appended (empty when no hasher is given, i.e. prefix caching off).
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        *,
        eos_token_ids: tuple[int, ...] = (),
        kv_transfer_params: dict[str, Any] | None = None,
        hasher: BlockHasher | None = None,
        arrival_time: float | None = None,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError(f"request {request_id}: prompt_token_ids must not be empty")
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        self.kv_transfer_params = kv_transfer_params
        self.status = RequestStatus.WAITING
        self.output_token_ids: list[int] = []
        self.output_logprobs: list[TokenLogprobs] = []  # one per output token, if asked for
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # local prefix-cache hit at first schedule
        self.num_external_tokens = 0  # supplied by the connector at first schedule
        self.num_preemptions = 0
        self.error: str | None = None
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_token_time: float | None = None
        self._all_token_ids = list(prompt_token_ids)
        self._hasher = hasher
        self._block_hashes: list[bytes] = []

    # -- RequestView ----------------------------------------------------------------------------
    @property
    def all_token_ids(self) -> list[int]:
        return self._all_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def finish_reason(self) -> str | None:
        return self.status.finish_reason

    @property
    def block_hashes(self) -> list[bytes]:
        if self._hasher is not None:
            self._hasher.extend(self._block_hashes, self._all_token_ids)
        return self._block_hashes

    # -- generation -----------------------------------------------------------------------------
    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival to the first generated token."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    def append_output_token(self, token_id: int, logprobs: TokenLogprobs | None = None) -> None:
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        self.output_token_ids.append(token_id)
        if logprobs is not None:
            self.output_logprobs.append(logprobs)
        self._all_token_ids.append(token_id)

    def check_stop(self, max_model_len: int) -> RequestStatus | None:
        """The finished status the last appended token implies, or ``None`` to go on."""
        params = self.sampling_params
        last = self.output_token_ids[-1] if self.output_token_ids else None
        if last is not None and last in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if last is not None and not params.ignore_eos and last in self.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if self.num_output_tokens >= params.max_tokens or self.num_tokens >= max_model_len:
            return RequestStatus.FINISHED_LENGTH_CAPPED
        return None

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens})"
        )


@dataclass(frozen=True)
class RequestOutput:
    """What a step returns for one request: every token generated so far, and how it ended.

    ``logprobs`` has one entry per token of ``token_ids`` when the request asked for them
    (``SamplingParams.logprobs``), else it is ``None``.
    """

    request_id: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    kv_transfer_params: dict[str, Any] | None
    num_cached_tokens: int
    num_external_tokens: int
    ttft: float | None
    error: str | None = None
    logprobs: list[TokenLogprobs] | None = None

    @classmethod
    def of(
        cls, request: Request, kv_transfer_params: dict[str, Any] | None = None
    ) -> RequestOutput:
        return cls(
            request_id=request.request_id,
            token_ids=list(request.output_token_ids),
            finished=request.is_finished,
            finish_reason=request.status.finish_reason,
            kv_transfer_params=kv_transfer_params,
            num_cached_tokens=request.num_cached_tokens,
            num_external_tokens=request.num_external_tokens,
            ttft=request.ttft,
            error=request.error,
            logprobs=(
                list(request.output_logprobs)
                if request.sampling_params.logprobs is not None
                else None
            ),
        )
