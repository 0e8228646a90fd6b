"""StopMatcher: the text ends before the first stop string, however the text is split."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvbridge.serve.stop import Matched, StopMatcher


def test_holds_back_a_tail_that_may_become_a_stop():
    m = StopMatcher(("END",))
    assert m.feed("abcE", final=False) == Matched("abc", None)
    assert m.feed("N", final=False) == Matched("", None)
    assert m.feed("x", final=False) == Matched("ENx", None)  # it did not: sent
    assert m.feed("yEND tail", final=False) == Matched("y", "END")


def test_held_text_is_sent_when_the_request_ends():
    m = StopMatcher(("###",))
    assert m.feed("ok#", final=False) == Matched("ok", None)
    assert m.feed("#", final=True) == Matched("##", None)


def test_earliest_stop_wins_then_the_one_listed_first():
    assert StopMatcher(("b", "a")).feed("xaxb", final=False) == Matched("x", "a")
    assert StopMatcher(("ab", "a")).feed("xab", final=False) == Matched("x", "ab")


def test_without_stops_text_passes_through():
    m = StopMatcher(())
    assert m.feed("anything", final=False) == Matched("anything", None)


def test_empty_stop_is_refused():
    with pytest.raises(ValueError, match="stop"):
        StopMatcher(("a", ""))


def _expected(text: str, stops: tuple[str, ...]) -> tuple[str, str | None]:
    hits = [(i, k) for k, s in enumerate(stops) if (i := text.find(s)) >= 0]
    if not hits:
        return text, None
    i, k = min(hits)
    return text[:i], stops[k]


@given(
    text=st.text(alphabet="abc", max_size=30),
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=8),
)
def test_any_split_gives_the_one_shot_answer(text: str, stops: list[str], cuts: list[int]):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)] or [""]
    m = StopMatcher(tuple(stops))
    sent, stop = "", None
    for j, piece in enumerate(pieces):
        out = m.feed(piece, final=j == len(pieces) - 1)
        sent += out.text
        if out.stop is not None:
            stop = out.stop
            break
    want_text, want_stop = _expected(text, tuple(stops))
    assert sent == want_text
    if want_stop is not None:
        assert stop is not None and text.find(stop) == len(want_text)
    else:
        assert stop is None


def test_a_longer_stop_that_starts_earlier_still_wins_across_a_split():
    """Found by the property test: 'a' completes first but 'baa' starts first."""
    m = StopMatcher(("a", "baa"))
    assert m.feed("ba", final=False) == Matched("", None)  # 'baa' may still complete
    assert m.feed("a", final=False) == Matched("", "baa")
    m = StopMatcher(("a", "baa"))
    assert m.feed("ba", final=False) == Matched("", None)
    assert m.feed("c", final=False) == Matched("b", "a")  # it did not: the earlier find wins
