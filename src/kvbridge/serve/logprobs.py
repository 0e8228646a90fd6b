"""Logprobs in the OpenAI API's two shapes, from the engine's ``TokenLogprobs``.

The numbers are the model's raw distribution at each position, before temperature and top-p
(``sampling.compute_logprobs``), from the very logits the token was sampled from.

A token's text is its bytes decoded as UTF-8; a token that is only part of a character is shown
as ``bytes:\\xe2\\x82`` (the OpenAI API's form), and a token with no text (BOS, EOS, ids the
byte tokenizer does not map) as ``token_id:N`` (vLLM's form). Chat entries also carry the
bytes (``null`` for a token with no text). A logprob too small for a float is ``-9999.0``, the
value the OpenAI API documents for "very unlikely".
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from kvbridge.engine.request import TokenLogprobs
from kvbridge.serve.tokenizer import Tokenizer

VERY_UNLIKELY = -9999.0


class TokenTexts:
    """Runs in the HTTP server; the display text and bytes of token ids, cached per id."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, _Token] = {}  # token id -> its text, bytes and width

    def get(self, token_id: int) -> tuple[str, list[int] | None]:
        token = self._token(token_id)
        return token.text, token.data

    def text(self, token_id: int) -> str:
        return self._token(token_id).text

    def width(self, token_id: int) -> int:
        """Characters the token adds to the answer's text; 0 for a token with no text of its
        own or only part of a character (an approximation for ``text_offset``)."""
        return self._token(token_id).width

    def _token(self, token_id: int) -> _Token:
        token = self._cache.get(token_id)
        if token is None:
            token = self._cache[token_id] = self._describe(token_id)
        return token

    def _describe(self, token_id: int) -> _Token:
        data = self.tokenizer.token_bytes(token_id)
        if not data:
            return _Token(f"token_id:{token_id}", None, 0)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return _Token("bytes:" + "".join(f"\\x{b:02x}" for b in data), list(data), 0)
        return _Token(text, list(data), len(text))


class _Token(NamedTuple):
    text: str
    data: list[int] | None
    width: int


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else VERY_UNLIKELY


class CompletionLogprobs:
    """Runs in the HTTP server; ``/v1/completions``'s ``logprobs`` object of one choice,
    from ``offset`` on: ``tokens``, ``token_logprobs``, ``top_logprobs`` (text -> logprob, the
    sampled token always included) and ``text_offset`` (each token's start in the answer)."""

    def __init__(self, texts: TokenTexts, offset: int = 0) -> None:
        self.texts = texts
        self._offset = offset  # where the next token's text starts in the answer

    def chunk(self, entries: list[TokenLogprobs]) -> dict[str, Any]:
        tokens: list[str] = []
        offsets: list[int] = []
        top: list[dict[str, float]] = []
        for entry in entries:
            text = self.texts.text(entry.token_id)
            tokens.append(text)
            offsets.append(self._offset)
            self._offset += self.texts.width(entry.token_id)
            ranked: dict[str, float] = {}
            for token_id, logprob in entry.top:
                ranked.setdefault(self.texts.text(token_id), finite(logprob))
            ranked.setdefault(text, finite(entry.logprob))
            top.append(ranked)
        return {
            "tokens": tokens,
            "token_logprobs": [finite(e.logprob) for e in entries],
            "top_logprobs": top,
            "text_offset": offsets,
        }


def chat_logprobs(texts: TokenTexts, entries: list[TokenLogprobs]) -> dict[str, Any]:
    """``/v1/chat/completions``'s ``logprobs`` object: ``{"content": [...], "refusal": null}``."""
    content = []
    for entry in entries:
        text, data = texts.get(entry.token_id)
        top = []
        for token_id, logprob in entry.top:
            top_text, top_data = texts.get(token_id)
            top.append({"token": top_text, "logprob": finite(logprob), "bytes": top_data})
        content.append(
            {"token": text, "logprob": finite(entry.logprob), "bytes": data, "top_logprobs": top}
        )
    return {"content": content, "refusal": None}
