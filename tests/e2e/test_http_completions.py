"""``POST /v1/completions`` on a real server: outputs match the engine, streaming, disconnects."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from e2e.http_fixtures import (
    RunningServer,
    metric_value,
    reference_tokens,
    running_server,
    sse_events,
)
from kvbridge.serve.tokenizer import ByteTokenizer

pytestmark = pytest.mark.e2e

PROMPTS = [[5, 17, 42, 99, 3, 250, 7], list(range(10, 45))]


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with running_server() as s:
        yield s


@pytest.fixture(scope="module")
def expected() -> list[list[int]]:
    return reference_tokens(PROMPTS, max_tokens=6, ignore_eos=True)


def test_completion_equals_engine_generate(server: RunningServer, expected: list[list[int]]):
    for prompt, want in zip(PROMPTS, expected):
        r = server.complete(prompt=prompt, max_tokens=6, temperature=0, ignore_eos=True)
        assert r.status_code == 200, r.text
        body = r.json()
        choice = body["choices"][0]
        assert choice["token_ids"] == want
        assert choice["finish_reason"] == "length"
        assert body["object"] == "text_completion" and body["model"] == "tiny"
        assert body["usage"]["prompt_tokens"] == len(prompt)
        assert body["usage"]["completion_tokens"] == 6
        assert body["kv_transfer_params"] is None


def test_stream_deltas_add_up_to_the_same_tokens(server: RunningServer, expected: list[list[int]]):
    body = {"prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    with server.client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.read().decode())
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    tokens = [t for c in chunks for t in c["choices"][0]["token_ids"]]
    assert tokens == expected[1]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    usage = [e for e in events[:-1] if not e["choices"]]
    assert usage[0]["usage"]["completion_tokens"] == 6


def test_text_prompt_uses_the_byte_tokenizer(server: RunningServer):
    text = "héllo, kv"
    ids = ByteTokenizer(bos_token_id=256).encode(text)
    want = reference_tokens([ids], max_tokens=4, ignore_eos=True)[0]
    r = server.complete(prompt=text, max_tokens=4, temperature=0, ignore_eos=True)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["token_ids"] == want
    assert r.json()["usage"]["prompt_tokens"] == len(ids) == len(text.encode()) + 1


def test_seeded_sampling_is_reproducible_and_seed_dependent(server: RunningServer):
    def run(seed: int) -> list[int]:
        r = server.complete(prompt=PROMPTS[0], max_tokens=8, temperature=1.0, seed=seed)
        assert r.status_code == 200, r.text
        return list(r.json()["choices"][0]["token_ids"])

    first = run(7)
    assert run(7) == first
    assert any(run(s) != first for s in (8, 9, 10))


def test_stop_token_ids_end_the_request(server: RunningServer, expected: list[list[int]]):
    stop = expected[0][2]
    r = server.complete(
        prompt=PROMPTS[0], max_tokens=6, temperature=0, ignore_eos=True, stop_token_ids=[stop]
    )
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["token_ids"] == expected[0][: expected[0].index(stop) + 1]


def test_repeated_prompt_hits_the_prefix_cache(server: RunningServer):
    prompt = list(range(100, 140))  # 40 tokens: two full blocks of 16
    before = metric_value(server.metrics(), "kvbridge:prompt_tokens_by_source_total",
                          source="local_cache_hit")  # fmt: skip
    for _ in range(2):
        r = server.complete(prompt=prompt, max_tokens=2, temperature=0)
        assert r.status_code == 200
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 32
    after = metric_value(server.metrics(), "kvbridge:prompt_tokens_by_source_total",
                         source="local_cache_hit")  # fmt: skip
    assert before is not None and after == before + 32


def _aborted(server: RunningServer) -> float:
    text = server.metrics()
    return metric_value(text, "kvbridge:request_success_total", finished_reason="abort") or 0.0


def test_client_disconnect_aborts_the_request(server: RunningServer):
    body = {"prompt": PROMPTS[0], "max_tokens": 3000, "ignore_eos": True, "stream": True}
    before = _aborted(server)
    with (
        httpx.Client(base_url=server.url, timeout=30, trust_env=False) as client,
        client.stream("POST", "/v1/completions", json=body) as r,
    ):
        assert next(r.iter_lines()).startswith("data: ")
    deadline = time.monotonic() + 20
    while _aborted(server) < before + 1:
        assert time.monotonic() < deadline, "the engine never aborted the disconnected request"
        time.sleep(0.02)
    _wait_idle(server)
    # The server keeps serving afterwards.
    assert server.complete(prompt=[1, 2, 3], max_tokens=2).status_code == 200


def test_non_streaming_client_timeout_aborts_the_request(server: RunningServer):
    body = {"prompt": PROMPTS[0], "max_tokens": 1000, "ignore_eos": True}
    before = _aborted(server)
    with (
        httpx.Client(base_url=server.url, timeout=0.3, trust_env=False) as client,
        pytest.raises(httpx.ReadTimeout),
    ):
        client.post("/v1/completions", json=body)
    deadline = time.monotonic() + 20
    while _aborted(server) < before + 1:
        assert time.monotonic() < deadline, "the engine never aborted the abandoned request"
        time.sleep(0.02)
    _wait_idle(server)
    assert metric_value(server.metrics(), "kvbridge:num_requests_in_server") == 0


def test_health_and_models(server: RunningServer):
    assert server.client.get("/health").json() == {"status": "ok"}
    assert server.client.get("/v1/models").json()["data"][0]["id"] == "tiny"


def _wait_idle(server: RunningServer) -> None:
    deadline = time.monotonic() + 20
    while server.loop.call(lambda e: e.has_unfinished_requests() or e.has_pending_transfers()):
        assert time.monotonic() < deadline, "engine still busy"
        time.sleep(0.02)


def test_engine_integrity_after_the_module(server: RunningServer):
    """Last test of the module: every block is back in the pool once the engine is idle."""
    _wait_idle(server)
    server.loop.call(lambda e: e.check_integrity())
    free, total = server.loop.call(
        lambda e: (e.block_manager.num_free_blocks, e.block_manager.num_blocks)
    )
    assert free == total
