"""LeaseProof: what one load knows of the producer's hold on its blocks, and what that proves.

A READ's bytes are good only if the producer held the blocks until the READ ended. Answers
to the load's lease questions (``lease_confirm.Settled``) prove it in one of three ways:

- "held, until T" to the question asked with the READ, with T past the READ's end (plus a
  margin): the common case, no round trip after the READ;
- "held" to a question asked after the READ was seen done: held then, so held throughout;
- "done": the lease ended by this consumer's "done", which it sends only once the READ is
  seen done.

Any other verdict ("expired", "released", "restarted", "refused") fails the load. Pure logic:
no sockets, no clocks of its own (times are the consumer's clock, passed in).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kvbridge.nixl.lease_confirm import Settled

HELD_MARGIN_S = 0.005  # a "held until" closer than this to the READ's end does not count
Decision = Literal["land", "ask_after_read", "fail"]


@dataclass
class LeaseProof:
    """Runs in a consumer worker, one per load; owns the load's promise and READ end."""

    held_until: float | None = None  # the producer holds the blocks at least until (our clock)
    read_end: float | None = None  # our clock when the READ was seen done
    asked_after_read: bool = False  # the open question was asked after the READ was seen done

    def bind(self) -> None:
        """A producer instance was bound: promises bind only the instance that gave them."""
        self.held_until = None

    def note(self, answer: Settled) -> None:
        """Keep how long a "held" answer proves the blocks held (other verdicts prove
        nothing before the READ ends)."""
        if answer.verdict == "held" and answer.held_until is not None:
            self.held_until = max(self.held_until or answer.held_until, answer.held_until)

    def read_seen_done(self, at: float) -> None:
        self.read_end = at

    @property
    def covers_read(self) -> bool:
        """The promise already in hand covers the READ, which was seen done."""
        return (
            self.held_until is not None
            and self.read_end is not None
            and self.read_end + HELD_MARGIN_S <= self.held_until
        )

    def ask_after_read(self) -> None:
        """A question is asked now that the READ is over: its "held" proves enough."""
        self.asked_after_read = True

    def judge(self, answer: Settled) -> Decision:
        """An answer that came after the READ was seen done."""
        if answer.verdict == "done":
            return "land"
        if answer.verdict != "held":
            return "fail"
        if self.asked_after_read:
            return "land"
        self.note(answer)
        return "land" if self.covers_read else "ask_after_read"
