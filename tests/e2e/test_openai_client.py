"""The official ``openai`` client against one monolithic ``kvbridge serve``: chat and
completions, sync and async, streamed and not, with usage and logprobs equal to the engine's."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from e2e.http_fixtures import RunningServer, metric_value, reference_outputs, running_server
from e2e.openai_helpers import (
    TOKENIZER,
    Answer,
    acollect,
    async_client,
    chat_answer,
    chat_prompt_ids,
    collect,
    compare_logprobs,
    completion_answer,
    sync_client,
)
from kvbridge.engine.request import RequestOutput

pytestmark = pytest.mark.e2e

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What does a KV cache hold?"},
]
PROMPT = "The KV cache of a transformer holds"
IGNORE_EOS = {"ignore_eos": True}  # fixed answer lengths from a random model
CHAT: dict[str, Any] = {"model": "tiny", "messages": MESSAGES, "max_tokens": 6, "temperature": 0,
                        "extra_body": IGNORE_EOS}  # fmt: skip
COMPLETION: dict[str, Any] = {"model": "tiny", "prompt": PROMPT, "max_tokens": 6,
                              "temperature": 0, "extra_body": IGNORE_EOS}  # fmt: skip


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with running_server() as s:
        yield s


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[openai.OpenAI]:
    with sync_client(server.url) as c:
        yield c


@pytest.fixture(scope="module")
def ref() -> dict[str, RequestOutput]:
    """The engine's own greedy answers, with top-3 logprobs, to the chat and the prompt."""
    chat, completion = reference_outputs(
        [chat_prompt_ids(MESSAGES), TOKENIZER.encode(PROMPT)], 6, ignore_eos=True, logprobs=3
    )
    return {"chat": chat, "completion": completion}


def engine_answer(out: RequestOutput) -> Answer:
    assert out.logprobs is not None
    return Answer(list(out.token_ids), logprobs=[lp.logprob for lp in out.logprobs])


def _check(answer: Answer, want: RequestOutput, *, top: int) -> None:
    assert not compare_logprobs(answer, engine_answer(want))
    assert answer.text == TOKENIZER.decode(want.token_ids)
    assert answer.finish_reason == "length"
    assert [len(t) for t in answer.top] == [top] * len(want.token_ids)
    # greedy: the sampled token is the most likely one
    assert [t[0][1] for t in answer.top] == pytest.approx(answer.logprobs)


def test_chat(client: openai.OpenAI, ref: dict[str, RequestOutput]):
    r = client.chat.completions.create(**CHAT, logprobs=True, top_logprobs=3)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "tiny"
    answer = chat_answer(r)
    _check(answer, ref["chat"], top=3)
    assert answer.role == "assistant"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        len(chat_prompt_ids(MESSAGES)), 6, len(chat_prompt_ids(MESSAGES)) + 6
    )  # fmt: skip


def test_chat_streamed_with_usage(client: openai.OpenAI, ref: dict[str, RequestOutput]):
    stream = client.chat.completions.create(
        **CHAT, logprobs=True, top_logprobs=3, stream=True, stream_options={"include_usage": True}
    )
    (answer,) = collect(stream, chat=True)
    _check(answer, ref["chat"], top=3)
    assert answer.role == "assistant" and answer.chunks == 6
    assert answer.usage.completion_tokens == 6
    assert answer.usage.prompt_tokens == len(chat_prompt_ids(MESSAGES))


def test_completions_with_logprobs(client: openai.OpenAI, ref: dict[str, RequestOutput]):
    r = client.completions.create(**COMPLETION, logprobs=2)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    whole = completion_answer(r)
    logprobs = r.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None
    assert len(logprobs.tokens) == 6 and logprobs.text_offset is not None
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    for token, top in zip(logprobs.tokens, logprobs.top_logprobs or [], strict=True):
        assert token in top and len(top) <= 3  # the sampled token is always there
    whole.top = [t[:2] for t in whole.top]
    _check(whole, ref["completion"], top=2)
    stream = client.completions.create(**COMPLETION, logprobs=2, stream=True)
    (streamed,) = collect(stream, chat=False)
    assert (streamed.token_ids, streamed.text, streamed.logprobs) == (
        whole.token_ids, whole.text, whole.logprobs
    )  # fmt: skip
    assert streamed.usage is None  # not asked for


def test_async_client_concurrent_calls(server: RunningServer, ref: dict[str, RequestOutput]):
    async def main() -> list[Answer]:
        async with async_client(server.url) as c:
            chat, comp = c.chat.completions, c.completions
            usage = {"include_usage": True}
            lps = {"logprobs": True, "top_logprobs": 3}
            calls = [
                chat.create(**CHAT, **lps),
                chat.create(**CHAT, **lps, stream=True, stream_options=usage),
                comp.create(**COMPLETION, logprobs=2),
                comp.create(**COMPLETION, logprobs=2, stream=True, stream_options=usage),
            ]
            r_chat, s_chat, r_comp, s_comp = await asyncio.gather(*calls)
            streamed = await asyncio.gather(acollect(s_chat, chat=True),
                                            acollect(s_comp, chat=False))  # fmt: skip
            return [chat_answer(r_chat), streamed[0][0], completion_answer(r_comp), streamed[1][0]]

    answers = asyncio.run(main())
    for answer, want in zip(answers, [ref["chat"]] * 2 + [ref["completion"]] * 2, strict=True):
        assert not compare_logprobs(answer, engine_answer(want))
    assert answers[1].usage.completion_tokens == answers[3].usage.completion_tokens == 6


def test_n_choices_with_a_seed_repeat_and_differ(client: openai.OpenAI):
    kwargs = {**CHAT, "max_tokens": 8, "temperature": 1.0, "seed": 5, "n": 3}
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    tokens = [list(c.token_ids) for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert tokens == [list(c.token_ids) for c in again.choices]
    assert len({tuple(t) for t in tokens}) == 3
    assert first.usage is not None and first.usage.completion_tokens == 24
    # choice i uses seed + i: choice 1 is the n=1 answer with seed 6
    single = client.chat.completions.create(**{**kwargs, "n": 1, "seed": 6})
    assert list(single.choices[0].token_ids) == tokens[1]
    streamed = collect(client.chat.completions.create(**kwargs, stream=True), chat=True)
    assert [a.token_ids for a in streamed] == tokens


def _finished(server: RunningServer, reason: str) -> float:
    text = server.metrics()
    return metric_value(text, "kvbridge:request_success_total", finished_reason=reason) or 0.0


def test_stop_strings_end_the_text_before_them(client: openai.OpenAI, server: RunningServer):
    full = client.completions.create(**{**COMPLETION, "max_tokens": 24}).choices[0].text
    at = next(i for i, ch in enumerate(full) if i > 0 and ch != "\ufffd")
    stop = full[at]
    stops_before, aborts_before = _finished(server, "stop"), _finished(server, "abort")
    r = client.completions.create(**{**COMPLETION, "max_tokens": 24}, stop=[stop, "never"])
    choice = r.choices[0]
    assert choice.text == full[: full.index(stop)]
    assert (choice.finish_reason, choice.stop_reason) == ("stop", stop)
    seeded = {**CHAT, "max_tokens": 24, "temperature": 1.0, "seed": 1}  # varied bytes
    streamed = collect(client.chat.completions.create(**seeded, stream=True), chat=True)[0]
    chat_stop = next(ch for ch in streamed.text[1:] if ch != "\ufffd")
    cut = collect(client.chat.completions.create(**seeded, stop=chat_stop, stream=True),
                  chat=True)[0]  # fmt: skip
    assert cut.text == streamed.text[: streamed.text.index(chat_stop)]
    assert (cut.finish_reason, cut.stop_reason) == ("stop", chat_stop)
    # the server ended both engine requests early, and counts them as stops, not aborts
    deadline = time.monotonic() + 20
    while _finished(server, "stop") < stops_before + 2:
        assert time.monotonic() < deadline, "the stopped requests never finished in the engine"
        time.sleep(0.02)
    assert _finished(server, "abort") == aborts_before


def test_client_leaving_a_chat_stream_aborts_every_choice(server: RunningServer):
    body = {"messages": MESSAGES, "max_tokens": 3000, "ignore_eos": True, "n": 2, "stream": True}
    before = _finished(server, "abort")
    with (
        httpx.Client(base_url=server.url, timeout=30, trust_env=False) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        assert next(r.iter_lines()).startswith("data: ")
    deadline = time.monotonic() + 20
    while _finished(server, "abort") < before + 2:
        assert time.monotonic() < deadline, "the engine never aborted both choices"
        time.sleep(0.02)
    assert metric_value(server.metrics(), "kvbridge:num_requests_in_server") == 0


def test_chat_without_max_tokens_fills_the_context(client: openai.OpenAI, server: RunningServer):
    limit = server.loop.max_model_len
    overhead = len(chat_prompt_ids([{"role": "user", "content": ""}]))
    fill = [{"role": "user", "content": "x" * (limit - overhead - 3)}]
    r = client.chat.completions.create(model="tiny", messages=fill, temperature=0,
                                       extra_body=IGNORE_EOS)  # fmt: skip
    assert r.usage is not None and r.usage.prompt_tokens == limit - 3
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="no room for an answer"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user",
                                       "content": "x" * (limit - overhead)}])  # fmt: skip


@pytest.mark.parametrize(
    ("call", "error", "param"),
    [
        ({"messages": [{"role": "robot", "content": "x"}]}, openai.BadRequestError,
         "messages[0].role"),
        ({"messages": MESSAGES, "model": "gpt-4"}, openai.NotFoundError, "model"),
        ({"messages": MESSAGES, "top_logprobs": 2}, openai.BadRequestError, "top_logprobs"),
        ({"messages": MESSAGES, "temperature": -1}, openai.BadRequestError, "temperature"),
        ({"messages": MESSAGES, "extra_body": {"best_of": 2}}, openai.BadRequestError,
         "best_of"),
        ({"prompt": "x", "logprobs": 21}, openai.BadRequestError, "logprobs"),
        ({"prompt": [1, 99999]}, openai.BadRequestError, None),  # refused by the engine
    ],
)  # fmt: skip
def test_errors_reach_the_client_typed_with_their_param(
    client: openai.OpenAI, call: dict[str, Any], error: type[openai.APIStatusError], param: str
):
    kwargs = {"model": "tiny", "max_tokens": 2, **call}
    for stream in (False, True):
        with pytest.raises(error) as info:
            if "prompt" in kwargs:
                client.completions.create(**kwargs, stream=stream)
            else:
                client.chat.completions.create(**kwargs, stream=stream)
        body = info.value.body
        assert isinstance(body, dict) and body["param"] == param and body["message"]
        assert body["type"] == "invalid_request_error" and body["code"] == info.value.status_code


def test_framework_errors_have_the_openai_shape(server: RunningServer):
    r = server.client.get("/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["message"] == "GET /v1/nope: Not Found"
    r = server.client.get("/v1/chat/completions")
    assert r.status_code == 405 and "POST" in r.headers["allow"]
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_models_and_engine_integrity_after_the_module(client: openai.OpenAI, server: RunningServer):
    """Last test of the module: the model is listed, and every block is back in the pool."""
    assert [m.id for m in client.models.list()] == ["tiny"]
    deadline = time.monotonic() + 20
    while server.loop.call(lambda e: e.has_unfinished_requests() or e.has_pending_transfers()):
        assert time.monotonic() < deadline, "engine still busy"
        time.sleep(0.02)
    server.loop.call(lambda e: e.check_integrity())
    free, total = server.loop.call(
        lambda e: (e.block_manager.num_free_blocks, e.block_manager.num_blocks)
    )
    assert free == total
