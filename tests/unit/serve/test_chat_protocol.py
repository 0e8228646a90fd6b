"""Chat request decoding: messages checked and named, lenient inside a message, the answer
length and logprobs fields."""

from __future__ import annotations

import json

import pytest

from kvbridge.serve.chat_protocol import decode_chat_request
from kvbridge.serve.protocol import RequestError

USER = {"role": "user", "content": "hi"}


def _decode(**body: object):  # type: ignore[no-untyped-def]
    return decode_chat_request(json.dumps({"messages": [USER], **body}).encode())


def test_defaults():
    req = _decode()
    assert req.messages[0].role == "user" and req.messages[0].text() == "hi"
    assert req.answer_tokens is None and req.num_logprobs is None and req.num_choices == 1


def test_text_parts_are_joined_and_copied_back_fields_ignored():
    parts = [{"type": "text", "text": "a "}, {"type": "text", "text": "b"}]
    earlier = {"role": "assistant", "content": "x", "refusal": None, "annotations": []}
    req = _decode(messages=[{"role": "user", "content": parts}, earlier, {"role": "user"}])
    assert [m.text() for m in req.messages] == ["a b", "x", ""]


def test_max_completion_tokens_wins_over_max_tokens():
    assert _decode(max_tokens=5).answer_tokens == 5
    assert _decode(max_tokens=5, max_completion_tokens=7).answer_tokens == 7


def test_logprobs_and_top_logprobs():
    assert _decode(logprobs=True).num_logprobs == 0
    assert _decode(logprobs=True, top_logprobs=4).num_logprobs == 4
    assert _decode(logprobs=False, top_logprobs=0).num_logprobs is None


@pytest.mark.parametrize(
    ("body", "needle", "param"),
    [
        ({"messages": []}, "messages: must not be empty", "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "'robot'", "messages[0].role"),
        ({"messages": [USER, {"content": "x"}]}, "`role`", "messages[1]"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "only text parts", "messages[0].content[0].type"),
        ({"messages": [{"role": "user", "content": 3}]}, "$.messages[0].content",
         "messages[0].content"),
        ({"top_logprobs": 2}, "needs logprobs set to true", "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "[0, 20]", "top_logprobs"),
        ({"max_completion_tokens": 0}, "max_completion_tokens: must be >= 1",
         "max_completion_tokens"),
        ({"prompt": "x"}, "unknown field `prompt`", "prompt"),
        ({"n": 0}, "n: must be in", "n"),
    ],
)  # fmt: skip
def test_invalid_fields_are_named(body: dict, needle: str, param: str):
    with pytest.raises(RequestError) as info:
        decode_chat_request(json.dumps({"messages": [USER], **body}).encode())
    assert info.value.status == 400
    assert needle in info.value.message
    assert info.value.param == param
