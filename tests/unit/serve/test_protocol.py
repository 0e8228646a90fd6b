"""Request decoding: strict types, unknown fields named, kv_transfer_params passed on as set."""

from __future__ import annotations

import json

import pytest

from kvbridge.serve.protocol import RequestError, decode_completion_request


def _decode(**body: object):  # type: ignore[no-untyped-def]
    return decode_completion_request(json.dumps(body).encode())


def test_defaults_and_token_prompt():
    req = _decode(prompt=[1, 2, 3])
    assert req.prompt == [1, 2, 3]
    assert (req.max_tokens, req.temperature, req.stream, req.n) == (16, 1.0, False, 1)
    assert req.kv_transfer_params is None


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


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"prompt": "x", "echo": True}, "unknown field `echo`"),
        ({"prompt": "x", "kv_transfer_params": {"remote_hots": "h"}}, "`remote_hots`"),
        ({"prompt": "x", "kv_transfer_params": {"remote_port": "80"}}, "remote_port"),
        ({"prompt": "x", "max_tokens": 2.5}, "$.max_tokens"),
        ({"prompt": "x", "max_tokens": True}, "$.max_tokens"),
        ({"prompt": ["a"]}, "$.prompt"),
        ({"prompt": "x", "stream_options": {"include_usage": 1}}, "include_usage"),
        ({"prompt": []}, "prompt"),
        ({"prompt": "x", "n": 3}, "n=1"),
        ({"prompt": "x", "kv_transfer_params": {"remote_block_ids": [1, -2]}}, "remote_block_ids"),
        (
            {"prompt": "x", "kv_transfer_params": {"remote_block_ids": [[1], [True]]}},
            "remote_block_ids",
        ),
    ],
)
def test_invalid_fields_are_named(body: dict, needle: str):
    with pytest.raises(RequestError) as info:
        decode_completion_request(json.dumps(body).encode())
    assert info.value.status == 400
    assert needle in info.value.message


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff\xfe", b'{"prompt": "x",}'])
def test_malformed_json(raw: bytes):
    with pytest.raises(RequestError, match="malformed JSON") as info:
        decode_completion_request(raw)
    assert info.value.status == 400
