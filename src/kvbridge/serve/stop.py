"""StopMatcher: finds a request's stop strings in its streamed text."""

from __future__ import annotations

from typing import NamedTuple


class Matched(NamedTuple):
    """What ``StopMatcher.feed`` returns: text to send now, and the stop string found (if any)."""

    text: str
    stop: str | None


class StopMatcher:
    """Runs in the HTTP server, one per choice; owns the text held back from the client.

    - Text ends right before the first stop string found (earliest position; at a tie, the
      stop listed first); nothing after it is sent.
    - A tail that could still grow into a stop string is held back until it cannot, or until
      the request ends (then it is sent); so is a stop found after the start of such a tail
      (a longer stop that starts earlier may still complete and win).
    - Without stop strings, text passes through unchanged.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        if any(not s for s in stops):
            raise ValueError("stop: stop strings must not be empty")
        self.stops = stops
        self._held = ""
        self._longest = max((len(s) for s in stops), default=0)

    def feed(self, text: str, *, final: bool) -> Matched:
        if not self.stops:
            return Matched(text, None)
        pending = self._held + text
        found = [(i, k) for k, s in enumerate(self.stops) if (i := pending.find(s)) >= 0]
        keep = 0 if final else self._partial_tail(pending)
        if found:
            i, k = min(found)
            if len(pending) - keep > i:  # no stop starting at or before i may still complete
                self._held = ""
                return Matched(pending[:i], self.stops[k])
        self._held = pending[len(pending) - keep :]
        return Matched(pending[: len(pending) - keep], None)

    def _partial_tail(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        for n in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
