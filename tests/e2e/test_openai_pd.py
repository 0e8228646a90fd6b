"""The official ``openai`` client through ``kvbridge proxy`` + a prefill and a decode server
(NIXL): chat and completions, sync and async, streamed and not, equal to a monolithic server's
answers token by token and logprob by logprob (``kvbridge.oracle``), and the oracle's control: KV
computed by other weights is flagged, also where the greedy tokens match."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from e2e.http_fixtures import RunningServer, metric_value, running_server
from e2e.openai_helpers import (
    Answer,
    acollect,
    async_client,
    chat_answer,
    collect,
    compare_logprobs,
    completion_answer,
    sync_client,
)
from kvbridge.config import TransferConfig
from kvbridge.serve.http_server import BackgroundServer
from kvbridge.serve.proxy import build_proxy_app
from support.nixl_marks import HAVE_NIXL

pytestmark = pytest.mark.e2e

IGNORE_EOS = {"ignore_eos": True}


def _messages(topic: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "You explain serving systems in one line."},
        {"role": "user", "content": f"Explain {topic} to a new engineer on the team."},
    ]


def _chat(topic: str, **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": _messages(topic), "max_tokens": 6, "temperature": 0,
            "logprobs": True, "top_logprobs": 2, "extra_body": IGNORE_EOS, **extra}  # fmt: skip


def _completion(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 2,
            "extra_body": IGNORE_EOS, **extra}  # fmt: skip


@dataclass
class Stack:
    prefill: RunningServer
    decode: RunningServer
    monolithic: RunningServer
    proxy: openai.OpenAI
    mono: openai.OpenAI
    proxy_url: str


def _nixl(role: str) -> TransferConfig:
    extra = {"side_channel_port": 0}
    return TransferConfig.from_dict(
        {"kv_connector": "NixlConnector", "kv_role": role, "kv_connector_extra_config": extra}
    )


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    if not HAVE_NIXL:
        pytest.skip("P/D over NIXL: no NIXL package installed")
    with ExitStack() as es:
        p = es.enter_context(running_server(kv_transfer_config=_nixl("kv_producer")))
        d = es.enter_context(running_server(kv_transfer_config=_nixl("kv_consumer")))
        mono = es.enter_context(running_server())
        proxy = es.enter_context(BackgroundServer(build_proxy_app([p.url], [d.url], timeout_s=60)))
        yield Stack(p, d, mono, es.enter_context(sync_client(proxy.url)),
                    es.enter_context(sync_client(mono.url)), proxy.url)  # fmt: skip


def _same(pd: Answer, mono: Answer) -> None:
    assert pd.token_ids and not compare_logprobs(pd, mono)
    assert pd.text == mono.text and pd.finish_reason == mono.finish_reason
    assert [[t for t, _ in top] for top in pd.top] == [[t for t, _ in top] for top in mono.top]


def _remote(answer: Answer, handover: bool = True) -> int:
    """Prompt tokens the decode server read from the prefill server: all when P handed its
    first token over (D computes that token instead of the prompt's last), else all but the
    last (a one-token answer: D samples the token itself)."""
    details = answer.usage.prompt_tokens_details
    local = 0 if handover else 1
    assert details.cached_tokens + details.external_tokens == answer.usage.prompt_tokens - local
    return int(details.external_tokens)


def test_chat_through_pd_equals_monolithic(stack: Stack):
    whole = chat_answer(stack.proxy.chat.completions.create(**_chat("prefix caching")))
    _same(whole, chat_answer(stack.mono.chat.completions.create(**_chat("prefix caching"))))
    assert _remote(whole) > 0
    usage = {"include_usage": True}
    kwargs = _chat("paged attention", stream=True, stream_options=usage)
    (streamed,) = collect(stack.proxy.chat.completions.create(**kwargs), chat=True)
    (mono,) = collect(stack.mono.chat.completions.create(**kwargs), chat=True)
    _same(streamed, mono)
    assert streamed.role == "assistant" and _remote(streamed) > 0


def test_completions_through_pd_equal_monolithic(stack: Stack):
    prompt = "Disaggregated prefill moves the KV cache from"
    whole = completion_answer(stack.proxy.completions.create(**_completion(prompt)))
    _same(whole, completion_answer(stack.mono.completions.create(**_completion(prompt))))
    kwargs = _completion(prompt + " one", stream=True, stream_options={"include_usage": True})
    (streamed,) = collect(stack.proxy.completions.create(**kwargs), chat=False)
    (mono,) = collect(stack.mono.completions.create(**kwargs), chat=False)
    _same(streamed, mono)
    assert _remote(streamed) > 0


def test_async_client_concurrent_calls_through_pd(stack: Stack):
    async def run(url: str) -> list[Answer]:
        async with async_client(url) as c:
            results = await asyncio.gather(
                c.chat.completions.create(**_chat("block tables")),
                c.chat.completions.create(**_chat("NIXL reads", stream=True)),
                c.completions.create(**_completion("A decode server waits for")),
                c.completions.create(**_completion("The proxy sends", stream=True)),
            )
            streamed = await asyncio.gather(acollect(results[1], chat=True),
                                            acollect(results[3], chat=False))  # fmt: skip
            return [chat_answer(results[0]), streamed[0][0], completion_answer(results[2]),
                    streamed[1][0]]  # fmt: skip

    for pd, mono in zip(asyncio.run(run(stack.proxy_url)), asyncio.run(run(stack.monolithic.url))):
        _same(pd, mono)


def test_n_seed_and_stop_through_pd(stack: Stack):
    kwargs = {**_chat("eviction", max_tokens=8), "temperature": 1.0, "seed": 3, "n": 2}
    pd, mono = (c.chat.completions.create(**kwargs) for c in (stack.proxy, stack.mono))
    for i in range(2):  # choice 0 reads the prefill's blocks, choice 1 computes its prompt
        _same(chat_answer(pd, i), chat_answer(mono, i))
    # a stop string from the answer (some seeds' answers are only partial UTF-8: try the next)
    text, stop = chat_answer(mono, 0).text, None
    for seed in range(4, 40):
        stop = next((ch for ch in text[1:] if ch != "\ufffd"), None)
        if stop is not None:
            break
        kwargs = {**kwargs, "seed": seed}
        text = chat_answer(stack.mono.chat.completions.create(**kwargs), 0).text
    assert stop is not None
    kwargs = {**kwargs, "n": 1, "stop": [stop], "stream": True}
    (cut,) = collect(stack.proxy.chat.completions.create(**kwargs), chat=True)
    assert cut.text == text[: text.index(stop)] and cut.finish_reason == "stop"


def test_client_errors_pass_through_the_proxy(stack: Stack):
    with pytest.raises(openai.BadRequestError) as info:
        stack.proxy.chat.completions.create(model="tiny", messages=[{"role": "robot",
                                                                     "content": "x"}])  # fmt: skip
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError, match="set by the proxy"):
        stack.proxy.chat.completions.create(**_chat("x", extra_body={"kv_transfer_params": {}}))
    assert [m.id for m in stack.proxy.models.list()] == ["tiny"]


def test_control_kv_from_other_weights_fails_the_oracle_even_where_tokens_match(stack: Stack):
    """The oracle's control (a deliberately broken P/D build): a producer on a checkpoint of
    other weights (seed 1) computes each prompt's KV wrongly; the prompt matches, so D reads
    its blocks. Every answer must fail the oracle against monolithic, including one whose greedy
    token equals monolithic's: a token-only check (the demo's before this oracle) passes that
    one, so this test fails with it."""
    prompts = [f"Wrong bytes for prompt {i} of the control look right" for i in range(8)]
    with ExitStack() as es:
        other = es.enter_context(running_server(seed=1, kv_transfer_config=_nixl("kv_producer")))
        url = es.enter_context(BackgroundServer(build_proxy_app([other.url], [stack.decode.url])))
        client = es.enter_context(sync_client(url.url))
        hidden = 0
        for prompt in prompts:
            body = _completion(prompt, max_tokens=1)
            wrong = completion_answer(client.completions.create(**body))
            want = completion_answer(stack.mono.completions.create(**body))
            assert _remote(wrong, handover=False) > 0  # D read the other weights' blocks
            assert compare_logprobs(wrong, want), prompt
            hidden += wrong.token_ids == want.token_ids
        assert hidden > 0  # the tokens alone would have passed these
        _wait_idle(stack.decode)


def _idle(server: RunningServer) -> bool:
    return not server.loop.call(lambda e: e.has_unfinished_requests() or e.has_pending_transfers())


def test_requests_were_disaggregated_and_blocks_released(stack: Stack):
    """Last test of the module: every request went P -> D, and both hold no blocks."""
    with httpx.Client(base_url=stack.proxy_url, trust_env=False, timeout=10) as c:
        text = c.get("/metrics").text
    assert (metric_value(text, "kvbridge:proxy_requests_total", route="local_prefill") or 0) == 0
    assert (metric_value(text, "kvbridge:proxy_requests_total", route="disaggregated") or 0) == 10
    for server in (stack.prefill, stack.decode):
        _wait_idle(server)


def _wait_idle(server: RunningServer) -> None:
    deadline = time.monotonic() + 30
    while not _idle(server):
        assert time.monotonic() < deadline, "blocks still held after 30s"
        time.sleep(0.02)
    server.loop.call(lambda e: e.check_integrity())
