"""Request decoding: strict types, unknown fields named (message and ``param``),
kv_transfer_params passed on as set, the OpenAI error shape."""

from __future__ import annotations

import json

import pytest

from kvbridge.serve.protocol import RequestError, decode_completion_request, error_body


def _decode(**body: object):  # type: ignore[no-untyped-def]
    return decode_completion_request(json.dumps(body).encode())


def test_defaults_and_token_prompt():
    req = _decode(prompt=[1, 2, 3])
    assert req.prompt == [1, 2, 3]
    assert (req.max_tokens, req.temperature, req.stream, req.n) == (None, None, False, None)
    assert (req.num_choices, req.stop_strings, req.include_usage) == (1, (), False)
    assert req.kv_transfer_params is None and req.logprobs is None


def test_nulls_mean_defaults_and_stop_becomes_a_tuple():
    req = _decode(prompt="x", max_tokens=None, temperature=None, top_p=None, n=None,
                  seed=None, stop="\n", logprobs=None, stream_options=None, user=None)  # fmt: skip
    assert req.num_choices == 1 and req.stop_strings == ("\n",)
    assert _decode(prompt="x", stop=["a", "bc"]).stop_strings == ("a", "bc")
    assert _decode(prompt="x", n=3).num_choices == 3


def test_kv_transfer_params_keep_only_what_was_set():
    req = _decode(prompt="x", kv_transfer_params={"do_remote_decode": True})
    assert req.kv_transfer_params is not None
    assert req.kv_transfer_params.to_dict() == {"do_remote_decode": True}
    remote = {"do_remote_prefill": True, "remote_engine_id": "p0", "remote_host": "127.0.0.1",
              "remote_port": 5000, "remote_block_ids": [[1, 2], [3, 4]],
              "remote_request_id": "r1", "tp_size": 1, "do_remote_decode": False}  # fmt: skip
    req = _decode(prompt="x", kv_transfer_params=remote)
    assert req.kv_transfer_params is not None
    assert req.kv_transfer_params.to_dict() == {k: v for k, v in remote.items() if v is not False}


BLOCK_IDS = "kv_transfer_params.remote_block_ids"
DECODE_N = {"prompt": "x", "n": 2, "kv_transfer_params": {"do_remote_decode": True}}


@pytest.mark.parametrize(
    ("body", "needle", "param"),
    [
        ({"prompt": "x", "echo": True}, "unknown field `echo`", "echo"),
        ({"prompt": "x", "kv_transfer_params": {"remote_hots": "h"}}, "`remote_hots`",
         "kv_transfer_params.remote_hots"),
        ({"prompt": "x", "kv_transfer_params": {"remote_port": "80"}}, "remote_port",
         "kv_transfer_params.remote_port"),
        ({"prompt": "x", "max_tokens": 2.5}, "$.max_tokens", "max_tokens"),
        ({"prompt": "x", "max_tokens": True}, "$.max_tokens", "max_tokens"),
        ({"prompt": ["a"]}, "$.prompt", "prompt[0]"),
        ({"prompt": "x", "stream_options": {"include_usage": 1}}, "include_usage",
         "stream_options.include_usage"),
        ({"prompt": []}, "prompt", "prompt"),
        ({"prompt": "x", "n": 0}, "n: must be in [1, 16]", "n"),
        ({"prompt": "x", "n": 17}, "n: must be in [1, 16]", "n"),
        (DECODE_N, "n: must be 1 with kv_transfer_params.do_remote_decode", "n"),
        ({"prompt": "x", "stop": ["a", ""]}, "stop: stop strings must not be empty", "stop"),
        ({"prompt": "x", "logprobs": "2"}, "$.logprobs", "logprobs"),
        ({"prompt": "x", "kv_transfer_params": {"remote_block_ids": [1, -2]}}, BLOCK_IDS,
         BLOCK_IDS),
        ({"prompt": "x", "kv_transfer_params": {"remote_block_ids": [[1], [True]]}}, BLOCK_IDS,
         BLOCK_IDS),
    ],
)  # fmt: skip
def test_invalid_fields_are_named(body: dict, needle: str, param: str):
    with pytest.raises(RequestError) as info:
        decode_completion_request(json.dumps(body).encode())
    assert info.value.status == 400
    assert needle in info.value.message
    assert info.value.param == param


def test_error_body_has_the_openai_shape():
    assert error_body(400, "n: bad", "n") == {
        "error": {"message": "n: bad", "type": "invalid_request_error", "param": "n", "code": 400}
    }
    assert error_body(503, "shutting down")["error"] == {
        "message": "shutting down", "type": "server_error", "param": None, "code": 503
    }  # fmt: skip


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff\xfe", b'{"prompt": "x",}'])
def test_malformed_json(raw: bytes):
    with pytest.raises(RequestError, match="malformed JSON") as info:
        decode_completion_request(raw)
    assert info.value.status == 400
