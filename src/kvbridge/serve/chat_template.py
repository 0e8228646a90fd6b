"""Chat templates: a conversation's prompt token ids, by the checkpoint's template or a simple one.

- A checkpoint whose tokenizer has a chat template is rendered with it (``transformers``'s
  ``apply_chat_template``, the assistant's turn opened).
- A checkpoint whose tokenizer has none answers every chat request 400, naming the checkpoint
  (``/v1/completions`` still works): guessing a template would give plausible nonsense.
- The random-weight configs (and checkpoints without tokenizer files) use the byte tokenizer
  and ``SimpleChatTemplate``: ChatML as plain text, documented there.
"""

from __future__ import annotations

import logging
from typing import Protocol

from kvbridge.serve.chat_protocol import ChatMessage
from kvbridge.serve.protocol import RequestError
from kvbridge.serve.tokenizer import HFTokenizer, Tokenizer

logger = logging.getLogger(__name__)


class ChatTemplate(Protocol):
    """Turns a conversation into prompt token ids; ``RequestError`` if it cannot."""

    @property
    def name(self) -> str: ...

    def render(self, messages: list[ChatMessage]) -> list[int]: ...


class SimpleChatTemplate:
    """Runs in the HTTP server; the template of tokenizers that have none of their own.

    Each message becomes ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` and the prompt ends
    with ``<|im_start|>assistant\\n``; the text is encoded by the tokenizer (the byte tokenizer
    puts BOS first). The markers are plain text, not special tokens: a random-weight model has
    no notion of roles, and the template only has to be stable and documented.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    @property
    def name(self) -> str:
        return "simple"

    @staticmethod
    def text(messages: list[ChatMessage]) -> str:
        turns = [f"<|im_start|>{m.role}\n{m.text()}<|im_end|>\n" for m in messages]
        return "".join(turns) + "<|im_start|>assistant\n"

    def render(self, messages: list[ChatMessage]) -> list[int]:
        return self.tokenizer.encode(self.text(messages))


class CheckpointChatTemplate:
    """Runs in the HTTP server; the checkpoint tokenizer's own chat template."""

    def __init__(self, tokenizer: HFTokenizer) -> None:
        self.tokenizer = tokenizer

    @property
    def name(self) -> str:
        return f"{self.tokenizer.name} template"

    def render(self, messages: list[ChatMessage]) -> list[int]:
        conversation = [_as_dict(m) for m in messages]
        try:
            return self.tokenizer.render_chat(conversation)
        except Exception as e:  # the template's own raise_exception, or a Jinja error
            raise RequestError(
                400, f"messages: the chat template refused them: {e}", param="messages"
            ) from None


class MissingChatTemplate:
    """Runs in the HTTP server; a checkpoint tokenizer without a chat template."""

    def __init__(self, tokenizer: HFTokenizer) -> None:
        self.tokenizer = tokenizer

    @property
    def name(self) -> str:
        return "none"

    def render(self, messages: list[ChatMessage]) -> list[int]:
        raise RequestError(
            400,
            f"messages: the checkpoint {self.tokenizer.path} has no chat template (no "
            "chat_template in tokenizer_config.json, no chat_template.jinja); use "
            "/v1/completions with a prompt, or add a template to the checkpoint",
            param="messages",
        )


def load_chat_template(tokenizer: Tokenizer) -> ChatTemplate:
    """The template chat requests are rendered with (see the module docstring)."""
    if not isinstance(tokenizer, HFTokenizer):
        return SimpleChatTemplate(tokenizer)
    if tokenizer.chat_template is None:
        logger.warning("%s has no chat template: /v1/chat/completions answers 400", tokenizer.path)
        return MissingChatTemplate(tokenizer)
    return CheckpointChatTemplate(tokenizer)


def _as_dict(message: ChatMessage) -> dict[str, str]:
    out = {"role": message.role, "content": message.text()}
    if message.name is not None:
        out["name"] = message.name
    return out
