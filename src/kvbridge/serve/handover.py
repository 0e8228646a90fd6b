"""The proxy's side of the first-token handover (SPEC §3): stream P's token at once.

The prefill server's answer carries the first token twice: as its choice (text, token ids,
logprobs when asked) and in ``kv_transfer_params.first_token``. For a streamed request the
proxy sends that choice to the client as the first chunk, before the decode server is even
asked; the decode server's stream starts with the same token (it took it over, or computed it
again), so ``TokenStripper`` removes it there: by ``token_ids`` when the chunks carry them
(kvbridge's servers), else by the token's text, plus the first logprobs entry.
"""

from __future__ import annotations

import json
import time
from typing import Any

CHAT_CHUNK = "chat.completion.chunk"
COMPLETION_CHUNK = "text_completion"


def first_token_chunk(prefill_answer: dict[str, Any], body: dict[str, Any]) -> bytes | None:
    """The SSE event that streams P's first token, or ``None`` when the decode server's
    stream must go out whole (several choices, stop strings, a one-token answer, P's token
    ends the answer or is part of a UTF-8 character, or P's answer is not one it can read)."""
    params = prefill_answer.get("kv_transfer_params")
    choices = prefill_answer.get("choices")
    if not isinstance(params, dict) or not isinstance(params.get("first_token"), dict):
        return None
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        return None
    if body.get("n") not in (None, 1) or body.get("stop") or body.get("echo"):
        return None
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None and (not isinstance(limit, int) or limit <= 1):
        return None  # one token, or a value D will refuse (the proxy does not check bodies)
    choice = choices[0]
    if choice.get("finish_reason") != "length":
        return None  # P's token was a stop token: the decode server says how the answer ends
    out: dict[str, Any] = {"index": 0}
    if "message" in choice:  # chat
        text = (choice.get("message") or {}).get("content")
        out["delta"] = {"role": "assistant", "content": text or ""}
        kind = CHAT_CHUNK
    else:
        text = choice.get("text")
        out["text"] = text or ""
        kind = COMPLETION_CHUNK
    if not isinstance(text, str | None) or (text or "").endswith("\ufffd"):
        return None  # a partial UTF-8 character: D's stream completes it in its own text
    out["logprobs"] = choice.get("logprobs")
    out["finish_reason"] = None
    if "token_ids" in choice:
        out["token_ids"] = choice["token_ids"]
    chunk = {
        "id": prefill_answer.get("id", ""),
        "object": kind,
        "created": prefill_answer.get("created", int(time.time())),
        "model": prefill_answer.get("model", body.get("model")),
        "choices": [out],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def first_token_text(prefill_answer: dict[str, Any]) -> str:
    choice = prefill_answer["choices"][0]
    if "message" in choice:
        return str((choice.get("message") or {}).get("content") or "")
    return str(choice.get("text") or "")


class TokenStripper:
    """Removes the first token of choice 0 from a decode server's SSE stream, event by event.

    ``feed`` takes raw bytes and returns what to send on; once the token is gone (``done``),
    the rest passes through untouched.
    """

    def __init__(self, text: str) -> None:
        self._text = text  # what is left of the token's text to remove
        self._token = True  # the token's id and logprobs entry are still to remove
        self._buffer = b""
        self.done = False

    def feed(self, data: bytes) -> bytes:
        if self.done:
            return data
        self._buffer += data
        out = []
        while not self.done:
            end = self._buffer.find(b"\n\n")
            if end < 0:
                break
            event, self._buffer = self._buffer[: end + 2], self._buffer[end + 2 :]
            out.append(self._event(event))
        if self.done:
            out.append(self._buffer)
            self._buffer = b""
        return b"".join(out)

    def flush(self) -> bytes:
        rest, self._buffer = self._buffer, b""
        return rest

    def _event(self, event: bytes) -> bytes:
        line = event.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            return event
        try:
            payload = json.loads(line[6:])
        except ValueError:
            return event
        choices = payload.get("choices") if isinstance(payload, dict) else None
        if not isinstance(choices, list):
            return event
        for choice in choices:
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                if self._strip(choice) and _empty(choice):
                    choices.remove(choice)
                    if not choices and "usage" not in payload:
                        return b""
                break
        return b"data: " + json.dumps(payload).encode() + b"\n\n"

    def _strip(self, choice: dict[str, Any]) -> bool:
        """Remove what is left of the token from ``choice``; ``True`` if anything went."""
        delta = choice.get("delta")
        holder, key = (delta, "content") if isinstance(delta, dict) else (choice, "text")
        if isinstance(delta, dict):
            delta.pop("role", None)  # the proxy's first chunk carried it
        text = holder.get(key) if isinstance(holder, dict) else None
        stripped = False
        if isinstance(text, str) and self._text:
            n = _common_prefix(text, self._text)
            holder[key] = text[n:]
            self._text = self._text[n:]
            stripped = n > 0
        ids = choice.get("token_ids")
        logprobs = choice.get("logprobs")
        if self._token:
            if isinstance(ids, list) and ids:
                choice["token_ids"] = ids[1:]
                self._token = False
            if isinstance(logprobs, dict) and _drop_first_logprob(logprobs):
                self._token = False
            stripped = stripped or not self._token
        if not self._text and (not self._token or ids is None):
            self.done = True
        return stripped


def _drop_first_logprob(logprobs: dict[str, Any]) -> bool:
    """Drop the first position of a completions or chat logprobs object; ``True`` if any."""
    dropped = False
    for key in ("content", "tokens", "token_logprobs", "top_logprobs", "text_offset"):
        entries = logprobs.get(key)
        if isinstance(entries, list) and entries:
            logprobs[key] = entries[1:]
            dropped = True
    return dropped


def _empty(choice: dict[str, Any]) -> bool:
    delta = choice.get("delta")
    text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
    return (
        not text
        and not choice.get("token_ids")
        and choice.get("finish_reason") is None
        and not (isinstance(delta, dict) and delta.get("tool_calls"))
    )


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
