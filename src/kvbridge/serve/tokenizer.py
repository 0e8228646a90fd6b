"""Tokenizers for text prompts: byte-level for random-weight models, or a checkpoint's own."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)

# Files whose presence means a checkpoint directory carries its own tokenizer.
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


class Tokenizer(Protocol):
    """Text <-> token ids, as the HTTP server needs it."""

    @property
    def name(self) -> str: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes one token stands for; ``None`` for a token with no text (BOS, EOS)."""
        ...


class ByteTokenizer:
    """Runs in the HTTP server; maps UTF-8 bytes to ids ``offset .. offset+255``.

    ``encode`` prepends ``bos_token_id`` when set; ``decode`` skips ids that are not bytes (BOS,
    EOS, anything a random model samples above 255) and replaces invalid UTF-8.
    """

    def __init__(self, *, offset: int = 0, bos_token_id: int | None = None) -> None:
        if offset < 0:
            raise ValueError(f"tokenizer offset: must be >= 0, got {offset}")
        self.offset = offset
        self.bos_token_id = bos_token_id

    @property
    def name(self) -> str:
        return "bytes"

    @property
    def vocab_size(self) -> int:
        """Ids this tokenizer can produce (the model's vocab must be at least this large)."""
        top = self.offset + 256
        return max(top, (self.bos_token_id or 0) + 1)

    def encode(self, text: str) -> list[int]:
        ids = [b + self.offset for b in text.encode("utf-8")]
        return ids if self.bos_token_id is None else [self.bos_token_id, *ids]

    def decode(self, token_ids: list[int]) -> str:
        data = bytes(t - self.offset for t in token_ids if 0 <= t - self.offset < 256)
        return data.decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes | None:
        byte = token_id - self.offset
        return bytes((byte,)) if 0 <= byte < 256 else None


class HFTokenizer:
    """Runs in the HTTP server; wraps a local checkpoint's ``transformers`` tokenizer."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer  # optional dependency, only for checkpoints

        self.path = Path(path)
        self._tok: Any = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self._special_ids = frozenset(self._tok.all_special_ids)

    @property
    def name(self) -> str:
        return f"hf:{self.path.name}"

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text))

    def decode(self, token_ids: list[int]) -> str:
        return str(self._tok.decode(token_ids, skip_special_tokens=True))

    def token_bytes(self, token_id: int) -> bytes | None:
        if token_id in self._special_ids:
            return None
        return str(self._tok.decode([token_id])).encode()

    @property
    def chat_template(self) -> str | None:
        """The checkpoint's chat template (``tokenizer_config.json`` or ``chat_template.jinja``)."""
        template = getattr(self._tok, "chat_template", None)
        return template if isinstance(template, str) and template else None

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt ids of a conversation through the checkpoint's template, with the
        assistant's turn opened; the template's own special tokens only (none added)."""
        text = self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self._tok.encode(str(text), add_special_tokens=False))


def has_hf_tokenizer(path: str | Path) -> bool:
    root = Path(path)
    return root.is_dir() and any((root / f).is_file() for f in _HF_TOKENIZER_FILES)


def load_tokenizer(model: str, *, bos_token_id: int | None = None) -> Tokenizer:
    """The checkpoint's tokenizer when ``model`` is a directory with tokenizer files, else bytes.

    A checkpoint without tokenizer files (random weights saved for tests) falls back to bytes.
    """
    if has_hf_tokenizer(model):
        try:
            return HFTokenizer(model)
        except ImportError:
            logger.warning("transformers is not installed; using the byte tokenizer for %s", model)
    return ByteTokenizer(bos_token_id=bos_token_id)


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas for streaming.

    Text ending in U+FFFD (a multi-byte character cut in half) is held back until more tokens
    arrive or the request ends.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._ids: list[int] = []
        self._sent = ""

    def add(self, new_ids: list[int], *, final: bool) -> str:
        self._ids.extend(new_ids)
        text = self.tokenizer.decode(self._ids)
        if not final and text.endswith("\ufffd"):
            return ""
        if not text.startswith(self._sent):  # a decoder that rewrites earlier text
            return ""
        delta, self._sent = text[len(self._sent) :], text
        return delta
