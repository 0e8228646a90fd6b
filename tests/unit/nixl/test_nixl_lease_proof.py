"""LeaseProof: which answers prove a READ's bytes good, on the consumer's clock alone."""

from __future__ import annotations

from typing import get_args

import pytest

from kvbridge.nixl.lease_confirm import Settled, Verdict
from kvbridge.nixl.lease_proof import HELD_MARGIN_S, LeaseProof


def held(until: float | None, asked_at: float = 0.0) -> Settled:
    return Settled("held", asked_at, until)


def after_read(at: float = 10.0) -> LeaseProof:
    proof = LeaseProof()
    proof.read_seen_done(at)
    return proof


def test_a_promise_past_the_reads_end_covers_it_and_one_short_of_the_margin_does_not() -> None:
    proof = LeaseProof()
    proof.note(held(10.0 + HELD_MARGIN_S))
    assert not proof.covers_read  # the READ is still running
    proof.read_seen_done(10.0)
    assert proof.covers_read
    short = after_read(10.0)
    short.note(held(10.0 + HELD_MARGIN_S / 2))
    assert not short.covers_read


def test_promises_only_extend_and_other_verdicts_promise_nothing() -> None:
    proof = after_read(10.0)
    proof.note(held(12.0))
    proof.note(held(11.0))  # an older, shorter promise
    proof.note(Settled("expired", 0.0))
    proof.note(held(None))  # "held" without a duration
    assert proof.held_until == 12.0 and proof.covers_read


def test_binding_another_instance_drops_its_promise() -> None:
    proof = after_read(10.0)
    proof.note(held(20.0))
    proof.bind()
    assert proof.held_until is None and not proof.covers_read


def test_a_held_answer_to_the_question_asked_with_the_read_must_cover_it() -> None:
    assert after_read(10.0).judge(held(20.0)) == "land"
    assert after_read(10.0).judge(held(10.0)) == "ask_after_read"
    assert after_read(10.0).judge(held(None)) == "ask_after_read"  # no promise given


def test_after_the_read_held_proves_it_with_no_time_left_and_done_always_does() -> None:
    proof = after_read(10.0)
    proof.ask_after_read()
    assert proof.judge(held(0.0)) == "land"  # held when asked, after the READ: held throughout
    assert after_read(10.0).judge(Settled("done", 0.0)) == "land"


@pytest.mark.parametrize("verdict", [v for v in get_args(Verdict) if v not in ("held", "done")])
@pytest.mark.parametrize("asked_after_read", [False, True])
def test_every_other_verdict_fails_the_load(verdict: Verdict, asked_after_read: bool) -> None:
    proof = after_read(10.0)
    proof.note(held(99.0))  # even with a promise in hand from before
    if asked_after_read:
        proof.ask_after_read()
    assert proof.judge(Settled(verdict, 11.0)) == "fail"
