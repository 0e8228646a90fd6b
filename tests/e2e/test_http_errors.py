"""Bad requests get a 4xx with a message naming the problem, and the server keeps serving."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from e2e.http_fixtures import RunningServer, metric_value, running_server

pytestmark = pytest.mark.e2e

GOOD = {"prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with running_server(max_body_bytes=64 * 1024) as s:
        yield s


def _post(server: RunningServer, content: bytes):  # type: ignore[no-untyped-def]
    return server.client.post(
        "/v1/completions", content=content, headers={"content-type": "application/json"}
    )


def _kv(params: object) -> bytes:
    return json.dumps({**GOOD, "kv_transfer_params": params}).encode()


BAD_BODIES = [
    pytest.param(b'{"prompt": [1, 2', "malformed JSON", id="truncated-json"),
    pytest.param(b"not json at all", "malformed JSON", id="not-json"),
    pytest.param(b"[1, 2, 3]", "Expected `object`", id="array-body"),
    pytest.param(json.dumps({**GOOD, "max_tokens": "3"}).encode(), "$.max_tokens", id="str-int"),
    pytest.param(json.dumps({**GOOD, "stream": "yes"}).encode(), "$.stream", id="str-bool"),
    pytest.param(json.dumps({**GOOD, "prompt": [1, "a"]}).encode(), "$.prompt", id="mixed-ids"),
    pytest.param(json.dumps({**GOOD, "temperature": -1}).encode(), "temperature", id="neg-temp"),
    pytest.param(json.dumps({**GOOD, "max_tokens": 0}).encode(), "max_tokens", id="zero-max"),
    pytest.param(json.dumps({**GOOD, "best_of": 2}).encode(), "`best_of`", id="unknown-field"),
    pytest.param(json.dumps({"max_tokens": 2}).encode(), "`prompt`", id="no-prompt"),
    pytest.param(json.dumps({**GOOD, "prompt": ""}).encode(), "prompt", id="empty-prompt"),
    pytest.param(json.dumps({**GOOD, "prompt": [70000]}).encode(), "[0, 512)", id="id-range"),
    pytest.param(json.dumps({**GOOD, "n": 0}).encode(), "n:", id="n-0"),
    pytest.param(json.dumps({**GOOD, "n": 17}).encode(), "n:", id="n-17"),
    pytest.param(_kv({"do_remote_decode": True, "bogus": 1}), "`bogus`", id="kv-unknown"),
    pytest.param(_kv({"do_remote_decode": "yes"}), "do_remote_decode", id="kv-wrong-type"),
    pytest.param(_kv({"remote_block_ids": ["a"]}), "remote_block_ids", id="kv-block-ids"),
    pytest.param(
        json.dumps({**GOOD, "kv_transfer_params": 3}).encode(),
        "kv_transfer_params",
        id="kv-not-object",
    ),
]


@pytest.mark.parametrize(("body", "needle"), BAD_BODIES)
def test_bad_request_is_400_naming_the_problem(server: RunningServer, body: bytes, needle: str):
    r = _post(server, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert needle in error["message"]
    assert error["code"] == 400 and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}
    assert server.complete(**GOOD).status_code == 200


def test_stream_failing_in_the_engine_still_gets_its_http_status(server: RunningServer):
    r = server.complete(prompt=[99999], max_tokens=2, stream=True)
    assert r.status_code == 400
    assert "prompt_token_ids" in r.json()["error"]["message"]
    assert server.complete(**GOOD, stream=True).status_code == 200


def test_oversize_prompt_is_400(server: RunningServer):
    limit = server.loop.max_model_len
    r = server.complete(prompt=[7] * (limit + 1), max_tokens=1)
    assert r.status_code == 400
    assert f"{limit + 1} tokens" in r.json()["error"]["message"]
    assert server.complete(**GOOD).status_code == 200


def test_body_over_the_limit_is_413(server: RunningServer):
    r = server.complete(prompt="x" * (200 * 1024), max_tokens=1)
    assert r.status_code == 413
    assert "65536 bytes" in r.json()["error"]["message"]
    assert server.complete(**GOOD).status_code == 200


def test_wrong_model_is_404(server: RunningServer):
    r = server.complete(**GOOD, model="gpt-4")
    assert r.status_code == 404
    assert "'gpt-4'" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "model"


def test_chat_errors_have_the_same_statuses(server: RunningServer):
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = server.client.post("/v1/chat/completions", json={**chat, "model": "gpt-4"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = server.client.post("/v1/chat/completions", json={**chat, "max_tokens": "2"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    big = {"messages": [{"role": "user", "content": "x" * (200 * 1024)}]}
    assert server.client.post("/v1/chat/completions", json=big).status_code == 413
    limit = server.loop.max_model_len
    long = {"messages": [{"role": "user", "content": "x" * limit}], "max_tokens": 1}
    r = server.client.post("/v1/chat/completions", json=long)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert server.client.post("/v1/chat/completions", json=chat).status_code == 200


def _rejected(server: RunningServer, status: str) -> float:
    return metric_value(server.metrics(), "kvbridge:request_rejected_total", status=status) or 0.0


def test_rejections_are_counted_and_engine_is_clean(server: RunningServer):
    before = _rejected(server, "400")
    assert _post(server, b"{").status_code == 400  # refused before the engine
    assert server.complete(prompt=[99999], max_tokens=1).status_code == 400  # by the engine
    assert _rejected(server, "400") == before + 2
    server.loop.call(lambda e: e.check_integrity())
    assert server.loop.call(lambda e: e.has_unfinished_requests()) is False
