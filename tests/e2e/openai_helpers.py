"""The official ``openai`` client against kvbridge servers: clients, streamed answers collected
into one record, prompts as the server builds them, and the logprob oracle helper.

``compare_logprobs`` runs kvbridge's correctness oracle (``kvbridge.oracle``) between two
servers' answers to the same greedy request (e.g. a P/D decode server and a monolithic one):
same tokens, and each token's logprob within the oracle's tolerance.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import openai

from kvbridge.oracle import TOLERANCE, OracleError, Trace, check
from kvbridge.serve.chat_protocol import ChatMessage
from kvbridge.serve.chat_template import SimpleChatTemplate
from kvbridge.serve.tokenizer import ByteTokenizer

TOKENIZER = ByteTokenizer(bos_token_id=256)  # what a server of a random-weight config uses


def sync_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60.0)


def async_client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60.0)


def chat_prompt_ids(messages: list[dict[str, str]]) -> list[int]:
    """The prompt a server of a random-weight config builds from ``messages``."""
    template = SimpleChatTemplate(TOKENIZER)
    return template.render([ChatMessage(m["role"], m["content"]) for m in messages])


@dataclass
class Answer:
    """One choice, from a whole answer or its streamed chunks put together."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)  # one per token, if asked
    top: list[list[tuple[str, float]]] = field(default_factory=list)  # most likely first
    finish_reason: str | None = None
    stop_reason: Any = None
    usage: Any = None
    role: str | None = None
    chunks: int = 0
    kv_transfer_params: Any = None

    def add_chat_logprobs(self, logprobs: Any) -> None:
        for entry in (logprobs.content or []) if logprobs is not None else []:
            self.logprobs.append(entry.logprob)
            self.top.append([(t.token, t.logprob) for t in entry.top_logprobs])

    def add_completion_logprobs(self, logprobs: Any) -> None:
        if logprobs is None:
            return
        self.logprobs.extend(logprobs.token_logprobs or [])
        self.top.extend(sorted(d.items(), key=lambda kv: -kv[1]) for d in logprobs.top_logprobs)


def chat_answer(response: Any, index: int = 0) -> Answer:
    choice = response.choices[index]
    answer = Answer(list(choice.token_ids), choice.message.content or "")
    answer.add_chat_logprobs(choice.logprobs)
    answer.finish_reason, answer.stop_reason = choice.finish_reason, choice.stop_reason
    answer.usage, answer.role = response.usage, choice.message.role
    answer.kv_transfer_params = getattr(response, "kv_transfer_params", None)
    return answer


def completion_answer(response: Any, index: int = 0) -> Answer:
    choice = response.choices[index]
    answer = Answer(list(choice.token_ids), choice.text)
    answer.add_completion_logprobs(choice.logprobs)
    answer.finish_reason, answer.stop_reason = choice.finish_reason, choice.stop_reason
    answer.usage = response.usage
    answer.kv_transfer_params = getattr(response, "kv_transfer_params", None)
    return answer


def _add_chunk(answers: dict[int, Answer], chunk: Any, chat: bool) -> None:
    if chunk.usage is not None:
        for answer in answers.values():
            answer.usage = chunk.usage
    for choice in chunk.choices:
        answer = answers.setdefault(choice.index, Answer())
        answer.chunks += 1
        answer.token_ids.extend(choice.token_ids)
        if chat:
            answer.role = answer.role or choice.delta.role
            answer.text += choice.delta.content or ""
            answer.add_chat_logprobs(choice.logprobs)
        else:
            answer.text += choice.text
            answer.add_completion_logprobs(choice.logprobs)
        if choice.finish_reason is not None:
            answer.finish_reason, answer.stop_reason = choice.finish_reason, choice.stop_reason
            answer.kv_transfer_params = getattr(chunk, "kv_transfer_params", None)


def collect(stream: Iterable[Any] | Iterator[Any], *, chat: bool) -> list[Answer]:
    """Every choice of a streamed answer, in index order (usage copied to each)."""
    answers: dict[int, Answer] = {}
    for chunk in stream:
        _add_chunk(answers, chunk, chat)
    return [answers[i] for i in sorted(answers)]


async def acollect(stream: AsyncIterator[Any], *, chat: bool) -> list[Answer]:
    answers: dict[int, Answer] = {}
    async for chunk in stream:
        _add_chunk(answers, chunk, chat)
    return [answers[i] for i in sorted(answers)]


def compare_logprobs(got: Answer, want: Answer, *, tol: float = TOLERANCE) -> list[str]:
    """What the oracle finds wrong with ``got`` against the reference ``want`` (same greedy
    request): tokens, or a token's logprob off by more than ``tol``. Empty: they agree."""
    try:
        expected = Trace(tuple(want.token_ids), tuple(want.logprobs))
        actual = Trace(tuple(got.token_ids), tuple(got.logprobs))
    except OracleError as e:
        return [f"logprobs missing: {e}"]
    problem = check(expected, actual, tol).problem
    return [] if problem is None else [problem]
