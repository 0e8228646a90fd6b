"""GenerationService: what ``/v1/completions`` and ``/v1/chat/completions`` share.

Errors: a malformed or ill-typed body, an unknown field (top level or in
``kv_transfer_params``), an empty or oversize prompt, a token id outside the vocab -> 400 (never
422: one status for every invalid body, as OpenAI and vLLM answer); wrong ``model`` -> 404; a
body over ``max_body_bytes`` -> 413; an engine failure -> 500; shutting down -> 503. Every error
body has the OpenAI shape (``protocol.error_body``) with a message naming the field. A streamed
request answers its status once the first output (or the failure) is known. A client that
disconnects gets its engine requests aborted.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, ClassVar

from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response

from kvbridge.engine.request import RequestOutput
from kvbridge.engine.sampling import SamplingParams
from kvbridge.serve.choice import ChoiceDelta, ChoiceState
from kvbridge.serve.engine_loop import EngineFailure, EngineLoop
from kvbridge.serve.generation import Generation, choice_params
from kvbridge.serve.logprobs import TokenTexts
from kvbridge.serve.metrics import ServerMetrics
from kvbridge.serve.protocol import GenerationRequest, RequestError, error_body, read_body
from kvbridge.serve.streaming import DONE, ClientGone, ClosingStream, sse, unless_disconnected
from kvbridge.serve.tokenizer import Tokenizer

# finish_reason -> HTTP status for requests the engine ended without generating normally.
_FAILED_FINISH = {"rejected": 400, "error": 500, "abort": 503}

Step = tuple[ChoiceState, ChoiceDelta] | EngineFailure | None


@dataclass(frozen=True)
class Job:
    """One decoded HTTP request: what to run and how to answer."""

    prompt_ids: list[int]
    params: list[SamplingParams]  # one per choice
    kv_transfer_params: dict[str, Any] | None
    stream: bool
    include_usage: bool
    stops: tuple[str, ...]


class GenerationService(ABC):
    """Runs in the server's event loop; turns one route's HTTP requests into engine requests
    and back. A subclass decodes its body (``prepare``) and shapes its choices
    (``chunk_choice``, ``final_choice``); status codes, streaming, usage, ``n`` choices,
    ``kv_transfer_params`` and disconnects are handled here, the same for every route."""

    id_prefix: ClassVar[str]
    object_name: ClassVar[str]
    chunk_object: ClassVar[str]

    def __init__(
        self,
        loop: EngineLoop,
        tokenizer: Tokenizer,
        metrics: ServerMetrics,
        *,
        model_name: str,
        max_body_bytes: int,
    ) -> None:
        self.loop = loop
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.model_name = model_name
        self.max_body_bytes = max_body_bytes
        self.texts = TokenTexts(tokenizer)

    @abstractmethod
    def prepare(self, body: bytes) -> Job:
        """Decode and check a body; ``RequestError`` names what is wrong."""

    @abstractmethod
    def chunk_choice(self, state: ChoiceState, delta: ChoiceDelta, first: bool) -> dict[str, Any]:
        """One choice of a streamed chunk (``first``: the choice's first chunk)."""

    @abstractmethod
    def final_choice(self, state: ChoiceState) -> dict[str, Any]:
        """One choice of a whole answer."""

    async def handle(self, request: HttpRequest) -> Response:
        try:
            body = await read_body(request, self.max_body_bytes)
            job = self.prepare(body)
            gen = Generation(self.loop, self.metrics, job.prompt_ids, job.params,
                             job.kv_transfer_params, id_prefix=self.id_prefix)  # fmt: skip
        except RequestError as e:
            return self._refuse(e.status, e.message, e.param)
        answer = _Answer(gen, [self._state(i, job) for i in range(len(job.params))])
        streaming: ClosingStream | None = None
        try:
            if not job.stream:
                failure = await unless_disconnected(request, answer.run())
                if failure is not None:
                    return self._refuse(failure.status, failure.message)
                return JSONResponse(self._final_body(answer))
            first = await unless_disconnected(request, answer.pull())
            if isinstance(first, EngineFailure):
                return self._refuse(first.status, first.message)
            streaming = ClosingStream(self._events(answer, job, first), on_close=gen.close)
            return streaming
        except ClientGone:
            return Response(status_code=499)
        finally:
            if streaming is None:
                gen.close()

    def _state(self, index: int, job: Job) -> ChoiceState:
        stop_ids = job.params[index].stop_token_ids
        return ChoiceState(
            index, self.tokenizer, stops=job.stops, stop_token_ids=stop_ids, lazy=not job.stream
        )

    # -- checks shared by the routes ------------------------------------------------------------
    def check_model(self, req: GenerationRequest) -> None:
        if req.model is not None and req.model != self.model_name:
            raise RequestError(
                404, f"model: {req.model!r} is not served here ({self.model_name})", param="model"
            )

    def check_prompt_length(self, ids: list[int], param: str) -> None:
        limit = self.loop.max_model_len
        if len(ids) > limit:
            raise RequestError(
                400,
                f"{param}: {len(ids)} tokens, more than this server holds ({limit} tokens)",
                param=param,
            )

    @staticmethod
    def sampling(
        req: GenerationRequest, *, max_tokens: int, logprobs: int | None
    ) -> SamplingParams:
        """The request's sampling params (OpenAI's defaults for what it leaves out)."""
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                seed=req.seed,
                stop_token_ids=tuple(req.stop_token_ids or ()),
                ignore_eos=req.ignore_eos,
                logprobs=logprobs,
            )
        except ValueError as e:
            key = str(e).split(":", 1)[0]
            raise RequestError(400, str(e), param=key if key.isidentifier() else None) from None

    @staticmethod
    def job(req: GenerationRequest, prompt_ids: list[int], params: SamplingParams) -> Job:
        return Job(
            prompt_ids=prompt_ids,
            params=[choice_params(params, i) for i in range(req.num_choices)],
            kv_transfer_params=(
                None if req.kv_transfer_params is None else req.kv_transfer_params.to_dict()
            ),
            stream=req.stream,
            include_usage=req.include_usage,
            stops=req.stop_strings,
        )

    # -- answers --------------------------------------------------------------------------------
    def _refuse(self, status: int, message: str, param: str | None = None) -> JSONResponse:
        self.metrics.rejected.labels(status=str(status)).inc()
        return JSONResponse(error_body(status, message, param), status_code=status)

    def _envelope(self, gen: Generation, kind: str, choices: list[Any]) -> dict[str, Any]:
        return {
            "id": gen.id,
            "object": kind,
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
        }

    def _final_body(self, answer: _Answer) -> dict[str, Any]:
        body = self._envelope(
            answer.gen, self.object_name, [self.final_choice(s) for s in answer.states]
        )
        body["usage"] = answer.usage()
        body["kv_transfer_params"] = answer.kv_transfer_params()
        return body

    async def _events(self, answer: _Answer, job: Job, step: Step) -> AsyncGenerator[bytes, None]:
        started: set[int] = set()
        while True:
            if isinstance(step, EngineFailure):
                self.metrics.rejected.labels(status=str(step.status)).inc()
                yield sse(error_body(step.status, step.message))
                break
            if step is not None:
                state, delta = step
                choice = self.chunk_choice(state, delta, state.index not in started)
                started.add(state.index)
                chunk = self._envelope(answer.gen, self.chunk_object, [choice])
                if delta.finish_reason is not None and state.index == 0:
                    chunk["kv_transfer_params"] = answer.kv_transfer_params()
                yield sse(chunk)
            if answer.finished:
                if job.include_usage:
                    usage = self._envelope(answer.gen, self.chunk_object, [])
                    usage["usage"] = answer.usage()
                    yield sse(usage)
                break
            step = await answer.pull()
        yield DONE


class _Answer:
    """The choices of one generation as the engine's outputs come in."""

    def __init__(self, gen: Generation, states: list[ChoiceState]) -> None:
        self.gen = gen
        self.states = states

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.states)

    async def pull(self) -> Step:
        """Take one engine output: a choice's delta to send, None (nothing to send yet), or the
        failure that ends the answer."""
        item = await self.gen.next()
        if isinstance(item, EngineFailure):
            return item
        index, out = item
        state = self.states[index]
        if state.finished:  # the aborted end of a choice a stop string ended
            return None
        failure = _failure(out)
        if failure is not None:
            return failure
        delta = state.advance(out)
        if out.finished:
            self.gen.done(index)
        elif state.ended_early:
            self.gen.stop(index)
        return None if delta is None else (state, delta)

    async def run(self) -> EngineFailure | None:
        """Pull until every choice finished (or one failed)."""
        while not self.finished:
            step = await self.pull()
            if isinstance(step, EngineFailure):
                return step
        return None

    def usage(self) -> dict[str, Any]:
        """Prompt counted once (its cache details from choice 0), every choice's tokens."""
        first = self.states[0].last
        prompt = self.gen.num_prompt_tokens
        completion = sum(len(s.token_ids) for s in self.states)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {
                "cached_tokens": first.num_cached_tokens if first else 0,
                "external_tokens": first.num_external_tokens if first else 0,
            },
        }

    def kv_transfer_params(self) -> dict[str, Any] | None:
        last = self.states[0].last
        return last.kv_transfer_params if last is not None else None


def _failure(out: RequestOutput) -> EngineFailure | None:
    """The error an abnormal finish stands for (rejected, failed or aborted by the engine)."""
    status = _FAILED_FINISH.get(out.finish_reason or "")
    if out.finished and status is not None:
        return EngineFailure(status, out.error or f"request ended: {out.finish_reason}")
    return None
