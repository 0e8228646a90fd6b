"""Logprobs in the OpenAI shapes: token texts, the completions object, the chat object."""

from __future__ import annotations

from kvbridge.engine.request import TokenLogprobs
from kvbridge.serve.logprobs import VERY_UNLIKELY, CompletionLogprobs, TokenTexts, chat_logprobs
from kvbridge.serve.tokenizer import ByteTokenizer

TEXTS = TokenTexts(ByteTokenizer(bos_token_id=256))
A, B, E_HALF, EOS = ord("a"), ord("b"), "é".encode()[0], 257


def test_token_texts():
    assert TEXTS.get(A) == ("a", [A]) and TEXTS.width(A) == 1
    assert TEXTS.get(E_HALF) == ("bytes:\\xc3", [0xC3]) and TEXTS.width(E_HALF) == 0
    assert TEXTS.get(EOS) == ("token_id:257", None) and TEXTS.width(EOS) == 0


def test_completion_shape_includes_the_sampled_token_and_offsets():
    entries = [
        TokenLogprobs(A, -0.5, 1, ((A, -0.5), (B, -1.5))),
        TokenLogprobs(EOS, -7.0, 9, ((B, -0.1), (A, -0.2))),  # sampled, not in the top 2
        TokenLogprobs(B, float("-inf"), 512, ()),
    ]
    body = CompletionLogprobs(TEXTS, offset=3).chunk(entries)
    assert body == {
        "tokens": ["a", "token_id:257", "b"],
        "token_logprobs": [-0.5, -7.0, VERY_UNLIKELY],
        "top_logprobs": [
            {"a": -0.5, "b": -1.5},
            {"b": -0.1, "a": -0.2, "token_id:257": -7.0},
            {"b": VERY_UNLIKELY},
        ],
        "text_offset": [3, 4, 4],
    }


def test_chat_shape():
    entries = [TokenLogprobs(A, -0.5, 1, ((A, -0.5), (EOS, -2.0)))]
    assert chat_logprobs(TEXTS, entries) == {
        "content": [
            {
                "token": "a",
                "logprob": -0.5,
                "bytes": [A],
                "top_logprobs": [
                    {"token": "a", "logprob": -0.5, "bytes": [A]},
                    {"token": "token_id:257", "logprob": -2.0, "bytes": None},
                ],
            }
        ],
        "refusal": None,
    }
