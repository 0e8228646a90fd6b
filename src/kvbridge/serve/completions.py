"""CompletionsService: ``POST /v1/completions`` (OpenAI's legacy completions, plus token ids)."""

from __future__ import annotations

from typing import Any, ClassVar

from kvbridge.engine.sampling import SamplingParams
from kvbridge.serve.choice import ChoiceDelta, ChoiceState
from kvbridge.serve.logprobs import CompletionLogprobs
from kvbridge.serve.protocol import (
    DEFAULT_COMPLETION_TOKENS,
    CompletionRequest,
    decode_completion_request,
)
from kvbridge.serve.service import GenerationService, Job


class CompletionsService(GenerationService):
    """Runs in the server's event loop; answers ``/v1/completions``.

    - ``prompt`` is text (encoded by the server's tokenizer) or a list of token ids.
    - A choice carries ``text`` and the ``token_ids`` it stands for; ``logprobs: k`` adds the
      OpenAI ``logprobs`` object (``tokens``, ``token_logprobs``, ``top_logprobs``,
      ``text_offset``).
    """

    id_prefix: ClassVar[str] = "cmpl"
    object_name: ClassVar[str] = "text_completion"
    chunk_object: ClassVar[str] = "text_completion"

    def prepare(self, body: bytes) -> Job:
        req = decode_completion_request(body)
        return self.job(req, self._prompt_ids(req), self._sampling(req))

    def _prompt_ids(self, req: CompletionRequest) -> list[int]:
        self.check_model(req)
        ids = self.tokenizer.encode(req.prompt) if isinstance(req.prompt, str) else req.prompt
        self.check_prompt_length(ids, "prompt")
        return ids

    def _sampling(self, req: CompletionRequest) -> SamplingParams:
        max_tokens = DEFAULT_COMPLETION_TOKENS if req.max_tokens is None else req.max_tokens
        return self.sampling(req, max_tokens=max_tokens, logprobs=req.logprobs)

    @staticmethod
    def _kv_params(req: CompletionRequest) -> dict[str, Any] | None:
        return None if req.kv_transfer_params is None else req.kv_transfer_params.to_dict()

    def chunk_choice(self, state: ChoiceState, delta: ChoiceDelta, first: bool) -> dict[str, Any]:
        logprobs = None
        if delta.logprobs is not None:
            formatter = CompletionLogprobs(self.texts, offset=len(state.text) - len(delta.text))
            logprobs = formatter.chunk(delta.logprobs)
        return _choice(state.index, delta, logprobs)

    def final_choice(self, state: ChoiceState) -> dict[str, Any]:
        logprobs = None
        if state.logprobs is not None:
            logprobs = CompletionLogprobs(self.texts).chunk(state.logprobs)
        whole = ChoiceDelta(
            state.text, state.token_ids, state.logprobs, state.finish_reason, state.stop_reason
        )
        return _choice(state.index, whole, logprobs)


def _choice(index: int, delta: ChoiceDelta, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "index": index,
        "text": delta.text,
        "token_ids": delta.token_ids,
        "logprobs": logprobs,
        "finish_reason": delta.finish_reason,
        "stop_reason": delta.stop_reason,
    }
