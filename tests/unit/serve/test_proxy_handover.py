"""The proxy streams P's first token at once and cuts D's copy of it (first-token handover).

P and D are small stand-in apps: P answers like ``kvbridge serve`` (or vLLM) with
``first_token`` in its params; D holds its stream until the client has received an event (or
``D_HOLD_S`` passed), so a D released by the client proves the proxy sent P's token first.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from kvbridge.serve.handover import TokenStripper, first_token_chunk
from kvbridge.serve.http_server import BackgroundServer
from kvbridge.serve.protocol import RequestError, decode_completion_request
from kvbridge.serve.proxy import build_proxy_app

D_HOLD_S = 30.0  # D streams after the client's first event, or after this (a failure)
PARAMS = {
    "do_remote_prefill": True,
    "remote_engine_id": "p",
    "remote_host": "127.0.0.1",
    "remote_port": 5600,
    "remote_block_ids": [1, 2],
    "first_token": {"token_id": 5},
}


def _event(choice: dict[str, Any], kind: str = "text_completion") -> bytes:
    return (
        b"data: " + json.dumps({"id": "d", "object": kind, "choices": [choice]}).encode() + b"\n\n"
    )


def _apps(d_events: list[bytes], prefill_choice: dict[str, Any]) -> tuple[Starlette, Starlette]:
    seen: dict[str, Any] = {}
    client_got_an_event = threading.Event()

    async def prefill(request: Request) -> JSONResponse:
        seen["prefill"] = await request.json()
        body = {"id": "p", "object": "text_completion", "created": 1, "model": "m",
                "choices": [prefill_choice], "kv_transfer_params": PARAMS}  # fmt: skip
        return JSONResponse(body)

    async def decode(request: Request) -> StreamingResponse:
        seen["decode"] = await request.json()

        async def events() -> AsyncIterator[bytes]:
            seen["d_released_by_client"] = await asyncio.to_thread(
                client_got_an_event.wait, D_HOLD_S
            )
            for event in d_events:  # split mid-event, as a network would
                yield event[:7]
                yield event[7:]
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    routes = ["/v1/completions", "/v1/chat/completions"]
    p = Starlette(routes=[Route(r, prefill, methods=["POST"]) for r in routes])
    d = Starlette(routes=[Route(r, decode, methods=["POST"]) for r in routes])
    p.state.seen = d.state.seen = seen
    p.state.client_got_an_event = client_got_an_event
    return p, d


def _stream(route: str, body: dict[str, Any], p: Starlette, d: Starlette) -> list[Any]:
    """(whether D streamed only after the client had an event, events) through a proxy in
    front of ``p`` and ``d``."""
    with (
        BackgroundServer(p) as ps,
        BackgroundServer(d) as ds,
        BackgroundServer(build_proxy_app([ps.url], [ds.url])) as proxy,
        httpx.Client(base_url=proxy.url, timeout=30, trust_env=False) as client,
    ):
        gate = getattr(p.state, "client_got_an_event", None)  # apps of _apps have one
        events = []
        with client.stream("POST", route, json={**body, "stream": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    if gate is not None:
                        gate.set()
                    events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
        handovers = "kvbridge:proxy_first_token_handovers_total 1.0"
        assert handovers in client.get("/metrics").text
        return [getattr(p.state, "seen", {}).get("d_released_by_client"), events]


def test_completions_first_token_comes_from_p_before_d_answers() -> None:
    d_events = [
        _event(
            {
                "index": 0,
                "text": " Hello",
                "token_ids": [5],
                "logprobs": None,
                "finish_reason": None,
            }
        ),
        _event(
            {
                "index": 0,
                "text": " world",
                "token_ids": [6],
                "logprobs": None,
                "finish_reason": None,
            }
        ),
        _event(
            {"index": 0, "text": "", "token_ids": [], "logprobs": None, "finish_reason": "length"}
        ),
    ]
    p_choice = {"index": 0, "text": " Hello", "token_ids": [5], "logprobs": None,
                "finish_reason": "length"}  # fmt: skip
    p, d = _apps(d_events, p_choice)
    body = {"prompt": [1, 2, 3], "max_tokens": 3, "logprobs": 1}
    d_after_client, events = _stream("/v1/completions", body, p, d)
    assert d_after_client  # P's token reached the client before D streamed anything
    choices = [e["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in choices) == " Hello world"
    assert [t for c in choices for t in c["token_ids"]] == [5, 6]
    assert choices[-1]["finish_reason"] == "length" and events[-1] == "[DONE]"
    assert p.state.seen["prefill"]["logprobs"] == 1  # P reports the first token's logprobs
    assert p.state.seen["prefill"]["max_tokens"] == 1
    assert d.state.seen["decode"]["kv_transfer_params"]["first_token"] == {"token_id": 5}


def test_a_vllm_shaped_chat_stream_loses_its_first_token_by_text() -> None:
    """vLLM's chunks carry no token ids and start with a role chunk."""
    chat = "chat.completion.chunk"
    d_events = [
        _event(
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            },
            chat,
        ),
        _event(
            {"index": 0, "delta": {"content": "Once"}, "logprobs": None, "finish_reason": None},
            chat,
        ),
        _event(
            {
                "index": 0,
                "delta": {"content": " upon"},
                "logprobs": None,
                "finish_reason": "length",
            },
            chat,
        ),
    ]
    p_choice = {"index": 0, "message": {"role": "assistant", "content": "Once"},
                "logprobs": None, "finish_reason": "length"}  # fmt: skip
    p, d = _apps(d_events, p_choice)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    d_after_client, events = _stream("/v1/chat/completions", body, p, d)
    assert d_after_client
    deltas = [e["choices"][0]["delta"] for e in events[:-1] if e["choices"]]
    assert deltas[0] == {"role": "assistant", "content": "Once"}
    assert "".join(x.get("content") or "" for x in deltas) == "Once upon"
    assert sum("role" in x for x in deltas) == 1


def test_stripper_drops_the_first_logprobs_entry_once() -> None:
    stripper = TokenStripper("A")
    lp = {"tokens": ["A", "B"], "token_logprobs": [-0.1, -0.2], "top_logprobs": [{}, {}],
          "text_offset": [0, 1]}  # fmt: skip
    out = stripper.feed(_event({"index": 0, "text": "AB", "token_ids": [1, 2], "logprobs": lp}))
    choice = json.loads(out[6:])["choices"][0]
    assert choice["text"] == "B" and choice["token_ids"] == [2]
    assert choice["logprobs"]["token_logprobs"] == [-0.2] and stripper.done
    later = _event({"index": 0, "text": "C", "token_ids": [3], "logprobs": lp})
    assert stripper.feed(later) == later  # done: passed through untouched


def test_a_bad_first_token_is_a_400_naming_the_field() -> None:
    body = {"prompt": [1], "kv_transfer_params": {**PARAMS, "first_token": {"token_id": 5,
            "logprob": 0.5}}}  # fmt: skip
    with pytest.raises(RequestError) as e:
        decode_completion_request(json.dumps(body).encode())
    assert e.value.status == 400
    assert e.value.param == "kv_transfer_params.first_token.logprob"
    assert "must be a finite number <= 0" in e.value.message


def test_a_partial_utf8_first_token_is_left_to_d() -> None:
    answer: dict[str, Any] = {"choices": [{"index": 0, "text": "\ufffd", "token_ids": [200],
                           "finish_reason": "length"}], "kv_transfer_params": PARAMS}  # fmt: skip
    assert first_token_chunk(answer, {"max_tokens": 4}) is None
    answer["choices"][0]["text"] = "ok"
    assert first_token_chunk(answer, {"max_tokens": 4}) is not None
    for body in ({"max_tokens": 1}, {"max_tokens": "4"}, {"max_completion_tokens": 1.5},
                 {"n": 2}, {"stop": "x"}):  # fmt: skip
        assert first_token_chunk(answer, body) is None, body


def test_d_failing_after_p_token_ends_the_stream_with_its_error() -> None:
    """The status (200) went out with P's token; D's 500 becomes an error event, then [DONE]."""
    message = "KV load failed from token 0 (kv_load_failure_policy=fail)"

    async def prefill(_: Request) -> JSONResponse:
        choice = {"index": 0, "text": "A", "token_ids": [5], "finish_reason": "length"}
        return JSONResponse({"id": "p", "choices": [choice], "kv_transfer_params": PARAMS})

    async def decode(_: Request) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "code": 500}}, status_code=500)

    p = Starlette(routes=[Route("/v1/completions", prefill, methods=["POST"])])
    d = Starlette(routes=[Route("/v1/completions", decode, methods=["POST"])])
    _, events = _stream("/v1/completions", {"prompt": [1], "max_tokens": 3}, p, d)
    assert events[0]["choices"][0]["token_ids"] == [5]
    assert message in events[1]["error"]["message"] and events[1]["error"]["code"] == 500
    assert events[2:] == ["[DONE]"]
