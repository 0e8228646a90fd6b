"""ChatService: ``POST /v1/chat/completions``."""

from __future__ import annotations

from typing import Any, ClassVar

from kvbridge.engine.request import TokenLogprobs
from kvbridge.serve.chat_protocol import decode_chat_request
from kvbridge.serve.chat_template import ChatTemplate, load_chat_template
from kvbridge.serve.choice import ChoiceDelta, ChoiceState
from kvbridge.serve.engine_loop import EngineLoop
from kvbridge.serve.logprobs import chat_logprobs
from kvbridge.serve.metrics import ServerMetrics
from kvbridge.serve.protocol import RequestError
from kvbridge.serve.service import GenerationService, Job
from kvbridge.serve.tokenizer import Tokenizer


class ChatService(GenerationService):
    """Runs in the server's event loop; answers ``/v1/chat/completions``.

    - The conversation becomes the prompt through ``template`` (``chat_template``'s rules).
    - Without ``max_tokens``/``max_completion_tokens`` the answer may fill the context.
    - A streamed choice's first delta carries ``role: "assistant"``; every choice also carries
      the ``token_ids`` it stands for (a kvbridge extension, as on ``/v1/completions``).
    - ``logprobs: true`` (with ``top_logprobs: k``) adds ``logprobs.content``, one entry per
      token with its ``top_logprobs``.
    """

    id_prefix: ClassVar[str] = "chatcmpl"
    object_name: ClassVar[str] = "chat.completion"
    chunk_object: ClassVar[str] = "chat.completion.chunk"

    def __init__(
        self,
        loop: EngineLoop,
        tokenizer: Tokenizer,
        metrics: ServerMetrics,
        *,
        model_name: str,
        max_body_bytes: int,
        template: ChatTemplate | None = None,
    ) -> None:
        super().__init__(
            loop, tokenizer, metrics, model_name=model_name, max_body_bytes=max_body_bytes
        )
        self.template = template if template is not None else load_chat_template(tokenizer)

    def prepare(self, body: bytes) -> Job:
        req = decode_chat_request(body)
        self.check_model(req)
        ids = self.template.render(req.messages)
        self.check_prompt_length(ids, "messages")
        max_tokens = req.answer_tokens
        if max_tokens is None:
            max_tokens = self.loop.max_model_len - len(ids)
            if max_tokens < 1:
                raise RequestError(
                    400,
                    f"messages: {len(ids)} tokens fill this server's context "
                    f"({self.loop.max_model_len} tokens); no room for an answer",
                    param="messages",
                )
        params = self.sampling(req, max_tokens=max_tokens, logprobs=req.num_logprobs)
        return self.job(req, ids, params)

    def chunk_choice(self, state: ChoiceState, delta: ChoiceDelta, first: bool) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant"} if first else {}
        message["content"] = delta.text
        return {
            "index": state.index,
            "delta": message,
            "logprobs": self._logprobs(delta.logprobs),
            "finish_reason": delta.finish_reason,
            "stop_reason": delta.stop_reason,
            "token_ids": delta.token_ids,
        }

    def final_choice(self, state: ChoiceState) -> dict[str, Any]:
        return {
            "index": state.index,
            "message": {"role": "assistant", "content": state.text},
            "logprobs": self._logprobs(state.logprobs),
            "finish_reason": state.finish_reason,
            "stop_reason": state.stop_reason,
            "token_ids": state.token_ids,
        }

    def _logprobs(self, entries: list[TokenLogprobs] | None) -> dict[str, Any] | None:
        return None if entries is None else chat_logprobs(self.texts, entries)
