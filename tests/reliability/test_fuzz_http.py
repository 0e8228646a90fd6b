"""Fuzz the ``/v1/completions`` request schema, in-process (1,000 cases) and over real HTTP.

In-process, each body goes through what the server does before generating: decode and
check the schema, resolve the prompt, build the sampling params, admit the request into a
real engine, and sample once with those params; the kv_transfer_params go through the
connector's validator. Every body ends in a typed refusal (``RequestError`` with a 4xx
status, or the engine's ``ValueError``, answered 400) or an accepted request, never another
exception. Over HTTP, nasty bodies (including the ones that once killed the engine thread)
get a 4xx and leave the server healthy, directly and through the P/D proxy.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from e2e.http_fixtures import RunningServer, running_server
from kvbridge.engine.engine import EngineConfig, LLMEngine
from kvbridge.engine.sampling import make_generator, sample
from kvbridge.nixl.params import KVTransferParamsError, parse_kv_transfer_params
from kvbridge.serve.api import CompletionsService
from kvbridge.serve.engine_loop import EngineLoop
from kvbridge.serve.http_server import BackgroundServer
from kvbridge.serve.metrics import ServerMetrics
from kvbridge.serve.protocol import RequestError, decode_completion_request
from kvbridge.serve.proxy import build_proxy_app
from kvbridge.serve.tokenizer import ByteTokenizer
from reliability.wire_cases import FUZZ_EXAMPLES, json_values, mutations, with_field

VALID: dict[str, Any] = {"prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0.5, "seed": 7}
VALID_BYTES = json.dumps(VALID).encode()
EDGE_FLOATS = [0, 0.0, -0.0, 5e-324, 1e-300, 1e-45, 1e-8, 1, 2.5, 1e308, -1.0]
kv_params = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {},
        optional={
            "do_remote_decode": st.booleans(),
            "do_remote_prefill": st.booleans(),
            "remote_engine_id": st.text(max_size=6),
            "remote_host": st.text(max_size=10),
            "remote_port": st.integers(-1, 70000),
            "remote_block_ids": json_values,
            "remote_request_id": st.text(max_size=6),
            "tp_size": st.integers(-1, 3) | st.none(),
        },
    ),
)
typed_fields = {
    "model": st.sampled_from(["tiny", "other", ""]),
    "max_tokens": st.integers(-2, 2**66),
    "temperature": st.sampled_from(EDGE_FLOATS) | st.floats(allow_nan=False, allow_infinity=False),
    "top_p": st.sampled_from(EDGE_FLOATS) | st.floats(allow_nan=False, allow_infinity=False),
    "seed": st.none() | st.integers(-2, 2**70) | st.sampled_from([2**64 - 1, 2**64]),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "stop_token_ids": st.lists(st.integers(-2, 2**65), max_size=4),
    "ignore_eos": st.booleans(),
    "n": st.integers(0, 3),
    "kv_transfer_params": kv_params,
}
prompts = st.one_of(
    st.text(max_size=30), st.lists(st.integers(-3, 600), max_size=12), st.just([]), json_values
)
well_formed = st.fixed_dictionaries(
    {"prompt": st.text(min_size=1, max_size=30) | st.lists(st.integers(0, 511), min_size=1)},
    optional={
        "max_tokens": st.integers(1, 4),
        "temperature": st.sampled_from(EDGE_FLOATS[:-1]),
        "top_p": st.sampled_from([5e-324, 1e-9, 0.5, 1]),
        "seed": st.none() | st.integers(0, 2**64 - 1),
        "stop_token_ids": st.lists(st.integers(0, 2**65), max_size=3),
        "kv_transfer_params": kv_params,
    },
).map(lambda d: json.dumps(d).encode())
bodies = st.one_of(
    well_formed,
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    mutations(VALID_BYTES),
    with_field(VALID).map(lambda d: json.dumps(d).encode()),
    st.fixed_dictionaries(
        {"prompt": prompts}, optional={k: v | json_values for k, v in typed_fields.items()}
    ).map(lambda d: json.dumps(d).encode()),
    st.fixed_dictionaries({"prompt": prompts}, optional=typed_fields).map(
        lambda d: json.dumps(d).encode()
    ),
)


class ServerSide:
    """What the server runs on a body before the first engine step, with a real engine."""

    def __init__(self) -> None:
        self.engine = LLMEngine(EngineConfig(model="tiny", num_gpu_blocks=16, max_model_len=48))
        loop = EngineLoop(self.engine)  # never started: the service only reads its limits
        self.service = CompletionsService(
            loop,
            ByteTokenizer(bos_token_id=self.engine.model_config.bos_token_id),
            ServerMetrics("tiny"),
            model_name="tiny",
            max_body_bytes=1 << 20,
        )
        vocab = self.engine.model_config.vocab_size
        self.logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(0)) * 8
        self.accepted = 0

    def admit(self, body: bytes) -> int:
        """The HTTP status this body gets before generation starts (200: admitted)."""
        try:
            req = decode_completion_request(body)
            prompt = self.service._prompt_ids(req)
            params = self.service._sampling(req)
            kv = self.service._kv_params(req)
        except RequestError as e:
            assert e.status in (400, 404) and e.message, (e.status, e.message)
            return e.status
        try:
            rid = self.engine.add_request(prompt, params, kv_transfer_params=kv)
        except ValueError as e:  # the engine loop answers these 400
            assert "prompt_token_ids" in str(e)
            return 400
        assert self.engine.abort_request(rid)
        (out,) = self.engine.step()
        assert out.request_id == rid and out.finish_reason == "abort"
        token = sample(self.logits, [params], [make_generator(params)])[0]
        assert 0 <= token < self.logits.shape[1]
        if kv is not None:
            try:
                parse_kv_transfer_params(kv)
            except KVTransferParamsError:
                pass  # the connector logs it and computes the prompt locally
        self.accepted += 1
        return 200


@pytest.fixture(scope="module")
def server_side() -> Iterator[ServerSide]:
    side = ServerSide()
    yield side
    side.engine.check_integrity()
    assert side.engine.block_manager.num_free_blocks == 16
    side.engine.shutdown()


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(bodies)
def test_every_body_is_admitted_or_refused_with_a_4xx(server_side: ServerSide, body: bytes) -> None:
    assert server_side.admit(body) in (200, 400, 404)


def test_the_fuzz_admitted_requests_too(server_side: ServerSide) -> None:
    assert server_side.accepted > 100


# -- regressions: bodies that once escaped as other exceptions or killed the engine thread ----
NASTY: list[tuple[str, bytes]] = [
    ("tiny temperature", b'{"prompt": [1, 2], "max_tokens": 2, "temperature": 1e-300}'),
    ("subnormal temperature", b'{"prompt": [1, 2], "max_tokens": 2, "temperature": 5e-324}'),
    (
        "top_p under float32",
        b'{"prompt": [1, 2], "max_tokens": 2, "temperature": 1, "top_p": 1e-50}',
    ),
    (
        "seed over 64 bits",
        b'{"prompt": [1, 2], "max_tokens": 2, "temperature": 1, "seed": '
        + str(2**64).encode()
        + b"}",
    ),
    ("invalid UTF-8", b'{"prompt": "\xff\xfe"}'),
    (
        "deep nesting",
        b'{"prompt": [1], "kv_transfer_params": {"remote_block_ids": '
        + b"[" * 20000
        + b"]" * 20000
        + b"}}",
    ),
    ("5000-digit int", b'{"prompt": [1], "max_tokens": ' + b"7" * 5000 + b"}"),
    ("token id out of vocab", b'{"prompt": [1, 99999], "max_tokens": 2}'),
    ("lone surrogate", b'{"prompt": "\\ud800"}'),
    ("NaN", b'{"prompt": [1], "temperature": NaN}'),
    ("not an object", b"[1, 2, 3]"),
    ("empty body", b""),
]


@pytest.mark.parametrize(("name", "body"), NASTY, ids=[n for n, _ in NASTY])
def test_nasty_bodies_are_refused_or_served_in_process(
    server_side: ServerSide, name: str, body: bytes
) -> None:
    assert server_side.admit(body) in (200, 400)


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with running_server(num_gpu_blocks=32) as s:
        yield s


@pytest.fixture(scope="module")
def proxy_client(server: RunningServer) -> Iterator[httpx.Client]:
    with (
        BackgroundServer(build_proxy_app([], [server.url], timeout_s=60)) as proxy,
        httpx.Client(base_url=proxy.url, timeout=60, trust_env=False) as client,
    ):
        yield client


def _post(client: httpx.Client, body: bytes) -> httpx.Response:
    return client.post(
        "/v1/completions", content=body, headers={"content-type": "application/json"}
    )


@pytest.mark.parametrize(("name", "body"), NASTY, ids=[n for n, _ in NASTY])
def test_nasty_bodies_over_http_leave_the_server_healthy(
    server: RunningServer, proxy_client: httpx.Client, name: str, body: bytes
) -> None:
    for client in (server.client, proxy_client):
        r = _post(client, body)
        assert r.status_code in (200, 400), (r.status_code, r.text[:200])
        if r.status_code == 400:
            assert r.json()["error"]["message"]
        assert server.client.get("/health").status_code == 200


def _short(body: bytes) -> bytes:
    """Keep generation short over HTTP: cap max_tokens of decodable bodies at 3."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return body
    if isinstance(value, dict) and isinstance(value.get("max_tokens"), int):
        value["max_tokens"] = max(-1, min(value["max_tokens"], 3))
        return json.dumps(value).encode()
    if isinstance(value, dict) and "max_tokens" not in value:
        value["max_tokens"] = 3
        return json.dumps(value).encode()
    return body


@settings(max_examples=40, deadline=None)
@given(bodies.map(_short))
def test_fuzzed_bodies_over_http_never_get_a_5xx(
    server: RunningServer, proxy_client: httpx.Client, body: bytes
) -> None:
    for client in (server.client, proxy_client):
        r = _post(client, body)
        assert r.status_code in (200, 400, 404), (r.status_code, r.text[:200])


def test_server_is_healthy_and_clean_after_the_http_fuzz(server: RunningServer) -> None:
    assert server.client.get("/health").json() == {"status": "ok"}
    r = server.complete(prompt=[1, 2, 3], max_tokens=2, temperature=0)
    assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) == 2
    server.loop.call(lambda e: e.check_integrity())
    assert server.loop.call(lambda e: e.block_manager.num_free_blocks) == 32
