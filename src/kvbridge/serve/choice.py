"""ChoiceState: one choice of an answer, from the engine's outputs to text deltas."""

from __future__ import annotations

from typing import NamedTuple

from kvbridge.engine.request import RequestOutput, TokenLogprobs
from kvbridge.serve.stop import StopMatcher
from kvbridge.serve.tokenizer import IncrementalDecoder, Tokenizer


class ChoiceDelta(NamedTuple):
    """What is new in a choice since the last delta."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None  # one per token id, if the request asked
    finish_reason: str | None  # set on the choice's last delta
    stop_reason: str | int | None  # the stop string or stop token id that ended it


class ChoiceState:
    """Runs in the HTTP server's event loop; owns one choice's detokenizer, stop matcher and
    what was sent of it (tokens, text, logprobs).

    - ``advance`` takes the engine's latest output of the choice and returns what is new, or
      ``None`` when there is nothing to send yet.
    - A stop string ends the choice "stop" (``stop_reason``: the string) at the token that
      completes it; the text ends before it and later tokens are dropped. ``ended_early`` then
      says the engine request is still running and must be ended by the caller.
    - A stop token id ends it "stop" with ``stop_reason`` that id; EOS with ``stop_reason`` None.
    - ``lazy`` (a non-streamed answer without stop strings): only the final output is decoded.
    """

    def __init__(
        self,
        index: int,
        tokenizer: Tokenizer,
        *,
        stops: tuple[str, ...] = (),
        stop_token_ids: tuple[int, ...] = (),
        lazy: bool = False,
    ) -> None:
        self.index = index
        self.lazy = lazy and not stops
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprobs] | None = None
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.last: RequestOutput | None = None  # the latest output taken
        self._decoder = IncrementalDecoder(tokenizer)
        self._matcher = StopMatcher(stops)
        self._stop_token_ids = frozenset(stop_token_ids)
        self._seen = 0  # output tokens looked at

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def ended_early(self) -> bool:
        """Finished here (a stop string) while the engine request still runs."""
        return self.finished and self.last is not None and not self.last.finished

    def advance(self, out: RequestOutput) -> ChoiceDelta | None:
        if self.finished or (self.lazy and not out.finished):
            return None
        self.last = out
        new_ids = out.token_ids[self._seen :]
        new_logprobs = None if out.logprobs is None else out.logprobs[self._seen :]
        self._seen = len(out.token_ids)
        if not new_ids and not out.finished:
            return None
        kept, text, stop = self._detokenize(new_ids, final=out.finished)
        logprobs = None if new_logprobs is None else new_logprobs[: len(kept)]
        if stop is not None:
            self.finish_reason, self.stop_reason = "stop", stop
        elif out.finished:
            self.finish_reason = out.finish_reason
            last = out.token_ids[-1] if out.token_ids else None
            if out.finish_reason == "stop" and last in self._stop_token_ids:
                self.stop_reason = last
        self.token_ids.extend(kept)
        self.text += text
        if logprobs is not None:
            self.logprobs = (self.logprobs or []) + logprobs
        return ChoiceDelta(text, kept, logprobs, self.finish_reason, self.stop_reason)

    def _detokenize(self, ids: list[int], *, final: bool) -> tuple[list[int], str, str | None]:
        """(tokens kept, their new text, the stop string that ended the choice or None)."""
        if not self._matcher.stops:
            return ids, self._decoder.add(ids, final=final), None
        if not ids:  # the request ended without a new token: flush what is held
            flushed = self._matcher.feed(self._decoder.add([], final=final), final=final)
            return [], flushed.text, None
        text = ""
        for j, token in enumerate(ids):
            last = final and j == len(ids) - 1
            matched = self._matcher.feed(self._decoder.add([token], final=last), final=last)
            text += matched.text
            if matched.stop is not None:
                return ids[: j + 1], text, matched.stop
        return ids, text, None
