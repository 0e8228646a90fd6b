"""Wire types of ``/v1/chat/completions`` (OpenAI format plus ``kv_transfer_params``).

The request is as strict as ``/v1/completions``'s, except inside a message: fields a client
copies back from an earlier answer (``refusal``, ``annotations``, ...) are ignored. Content is
a string or a list of ``{"type": "text", "text": ...}`` parts.
"""

from __future__ import annotations

import msgspec

from kvbridge.engine.sampling import MAX_LOGPROBS
from kvbridge.serve.protocol import GenerationRequest, RequestError, decode_body

ROLES = ("system", "developer", "user", "assistant", "tool")


class ContentPart(msgspec.Struct):
    """One part of a message's content; only ``text`` parts are supported."""

    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct):
    """One message of the conversation."""

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The content as one string (text parts joined, ``None`` as empty)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)


class ChatCompletionRequest(GenerationRequest, kw_only=True):
    """Body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # wins over max_tokens (OpenAI's newer name)
    logprobs: bool | None = None
    top_logprobs: int | None = None

    @property
    def answer_tokens(self) -> int | None:
        """The requested answer length, or None (as long as the context allows)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        """Most likely tokens to report per position, or None (no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def check(self) -> None:
        """Value checks msgspec's types cannot express; raises ``RequestError`` (400)."""
        self.check_common()
        if not self.messages:
            raise RequestError(400, "messages: must not be empty", param="messages")
        for i, message in enumerate(self.messages):
            if message.role not in ROLES:
                raise RequestError(
                    400,
                    f"messages[{i}].role: {message.role!r} is not one of {', '.join(ROLES)}",
                    param=f"messages[{i}].role",
                )
            if isinstance(message.content, list):
                for j, part in enumerate(message.content):
                    if part.type != "text" or part.text is None:
                        where = f"messages[{i}].content[{j}]"
                        raise RequestError(
                            400,
                            f"{where}: only text parts are supported, got type {part.type!r}",
                            param=f"{where}.type",
                        )
        if self.max_completion_tokens is not None and self.max_completion_tokens < 1:
            raise RequestError(
                400,
                f"max_completion_tokens: must be >= 1, got {self.max_completion_tokens}",
                param="max_completion_tokens",
            )
        k = self.top_logprobs
        if k is not None and not 0 <= k <= MAX_LOGPROBS:
            raise RequestError(
                400, f"top_logprobs: must be in [0, {MAX_LOGPROBS}], got {k}", param="top_logprobs"
            )
        if k and not self.logprobs:
            raise RequestError(
                400, "top_logprobs: needs logprobs set to true", param="top_logprobs"
            )


_decoder = msgspec.json.Decoder(ChatCompletionRequest)


def decode_chat_request(body: bytes) -> ChatCompletionRequest:
    """Parse and validate a ``/v1/chat/completions`` body; errors name the field."""
    request: ChatCompletionRequest = decode_body(_decoder, body)
    request.check()
    return request
