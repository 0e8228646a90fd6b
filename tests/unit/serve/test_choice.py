"""ChoiceState: engine outputs -> text deltas, stop strings and stop tokens, logprobs kept
in step with the tokens."""

from __future__ import annotations

from kvbridge.engine.request import RequestOutput, TokenLogprobs
from kvbridge.serve.choice import ChoiceState
from kvbridge.serve.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def _out(text_or_ids: str | list[int], *, finished: bool = False, reason: str | None = None,
         logprobs: bool = False) -> RequestOutput:  # fmt: skip
    ids = list(text_or_ids.encode()) if isinstance(text_or_ids, str) else text_or_ids
    lps = [TokenLogprobs(t, -float(i), 1, ()) for i, t in enumerate(ids)] if logprobs else None
    return RequestOutput("r", ids, finished, reason if finished else None, None, 0, 0, None,
                         logprobs=lps)  # fmt: skip


def test_deltas_add_up_and_the_last_one_finishes():
    s = ChoiceState(0, TOK)
    texts = []
    for end in range(1, 6):
        delta = s.advance(_out("hello"[:end], finished=end == 5, reason="length"))
        assert delta is not None
        texts.append(delta.text)
    assert "".join(texts) == s.text == "hello"
    assert s.token_ids == list(b"hello") and s.finish_reason == "length"
    assert delta.finish_reason == "length" and not s.ended_early
    assert s.advance(_out("hello!", finished=True, reason="length")) is None  # already done


def test_stop_string_ends_at_the_token_completing_it():
    s = ChoiceState(0, TOK, stops=("\n\n",))
    d1 = s.advance(_out("ab\n", logprobs=True))
    assert d1 is not None and d1.text == "ab" and d1.token_ids == list(b"ab\n")  # "\n" held
    d2 = s.advance(_out("ab\n\nzz", logprobs=True))  # several tokens at once; stop mid-way
    assert d2 is not None and d2.text == "" and d2.token_ids == [ord("\n")]
    assert (d2.finish_reason, d2.stop_reason) == ("stop", "\n\n")
    assert s.text == "ab" and s.token_ids == list(b"ab\n\n")
    assert s.logprobs is not None and [lp.token_id for lp in s.logprobs] == s.token_ids
    assert s.ended_early  # the engine request still runs: the caller ends it


def test_held_text_is_sent_when_the_request_ends():
    s = ChoiceState(0, TOK, stops=("STOP",))
    assert s.advance(_out("okST")).text == "ok"  # type: ignore[union-attr]
    last = s.advance(_out("okST", finished=True, reason="length"))
    assert last is not None and last.text == "ST" and last.token_ids == []
    assert s.text == "okST" and s.finish_reason == "length" and s.stop_reason is None


def test_stop_token_id_is_the_stop_reason_eos_is_not():
    s = ChoiceState(0, TOK, stop_token_ids=(ord("!"),))
    s.advance(_out("hi!", finished=True, reason="stop"))
    assert (s.finish_reason, s.stop_reason) == ("stop", ord("!"))
    eos = ChoiceState(0, TOK, stop_token_ids=(ord("!"),))
    eos.advance(_out([104, 257], finished=True, reason="stop"))
    assert (eos.finish_reason, eos.stop_reason) == ("stop", None)


def test_lazy_state_decodes_only_the_final_output():
    s = ChoiceState(0, TOK, lazy=True)
    assert s.advance(_out("he")) is None and s.text == ""
    s.advance(_out("hey", finished=True, reason="length"))
    assert s.text == "hey" and s.token_ids == list(b"hey")
    # stop strings need every output: a lazy state with stops is not lazy
    assert not ChoiceState(0, TOK, stops=("x",), lazy=True).lazy


def test_split_character_is_held_until_complete():
    a, b = "é".encode()
    s = ChoiceState(0, TOK)
    assert s.advance(_out([a])).text == ""  # type: ignore[union-attr]
    assert s.advance(_out([a, b], finished=True, reason="length")).text == "é"  # type: ignore[union-attr]
