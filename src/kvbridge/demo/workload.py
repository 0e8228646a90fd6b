"""The demo workload: one system prompt shared by several users, each in a multi-turn chat.

Turn 1 of a user is ``system prompt + question``; turn k+1 is turn k's prompt + its answer + the
next question, so every turn extends the previous one (the prefix the KV cache can reuse).
Users talk concurrently; a user's turns go one after another. Prompts travel as token ids,
encoded with the server's own tokenizer, so a model's answer (any id) is appended verbatim.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from kvbridge.serve.tokenizer import Tokenizer

SYSTEM_PROMPT = (
    "You are the support assistant of a company that runs GPU clusters for language models. "
    "Answer in two or three sentences, be precise about numbers, and say when you do not know. "
    "Context: prefill and decode run on separate servers; the decode server pulls the prompt's "
    "KV cache blocks from the prefill server over NIXL, and both servers keep a copy of full "
    "blocks in pinned CPU memory so that a returning conversation skips its prefill. "
)
TOPICS = (
    "the cost of a 32k-token prompt",
    "why my second question is faster than the first",
    "what happens when the CPU pool is full",
    "how the decode server finds the prefill server",
    "whether answers change when the KV cache is reused",
    "how to size the CPU offload pool",
    "what a lease on prefill blocks is for",
    "how many requests one decode server can hold",
)
FOLLOW_UPS = ("Tell me more about {topic}.", "And what are the trade-offs?", "Summarise that.")
# The warm-up request's text: shares no block with the workload's prompts (no prefix reuse).
WARM_UP_TEXT = (
    "Warm-up request, not part of the workload: it compiles kernels, makes the connectors' "
    "first handshakes and fills the allocators' pools before any request is timed. " * 3
)


@dataclass(frozen=True)
class WorkloadSpec:
    """How many users, turns and requests; ``requests`` counts turn by turn over the users."""

    users: int
    turns: int
    requests: int
    max_tokens: int

    @classmethod
    def build(
        cls, *, users: int, turns: int, requests: int | None, max_tokens: int
    ) -> WorkloadSpec:
        """``requests`` (if set) overrides ``turns``: users x ceil(requests / users) turns, cut
        to ``requests``. Errors name the flag."""
        for flag, value in (("--users", users), ("--turns", turns), ("--max-tokens", max_tokens)):
            if value < 1:
                raise ValueError(f"{flag}: must be >= 1, got {value}")
        if requests is not None:
            if requests < 1:
                raise ValueError(f"--requests: must be >= 1, got {requests}")
            users = min(users, requests)
            turns = math.ceil(requests / users)
        return cls(users, turns, requests or users * turns, max_tokens)

    def turns_of(self, user: int) -> int:
        """Turns user ``user`` takes (the last turn may be cut short of ``users``)."""
        return sum(1 for t in range(self.turns) if t * self.users + user < self.requests)


@dataclass(frozen=True)
class RequestRecord:
    """One completed (or failed) request: its prompt, answer and timing at the client."""

    user: int
    turn: int
    prompt: tuple[int, ...]
    token_ids: tuple[int, ...]
    ttft_s: float | None
    latency_s: float
    error: str | None = None
    logprobs: tuple[float, ...] = ()  # each answer token's log-probability, for the oracle


class PromptBuilder:
    """Runs in the demo process; turns the conversation text into token ids."""

    def __init__(self, tokenizer: Tokenizer, bos_token_id: int | None) -> None:
        self.tokenizer = tokenizer
        self.bos_token_id = bos_token_id

    def _encode(self, text: str) -> list[int]:
        """Text that continues a prompt: no BOS."""
        ids = self.tokenizer.encode(text)
        if ids and self.bos_token_id is not None and ids[0] == self.bos_token_id:
            ids = ids[1:]
        return ids

    @staticmethod
    def question(user: int, turn: int) -> str:
        topic = TOPICS[user % len(TOPICS)]
        if turn == 0:
            return f"\nUser {user + 1}: I have a question about {topic}.\nAssistant:"
        follow_up = FOLLOW_UPS[(turn - 1) % len(FOLLOW_UPS)].format(topic=topic)
        return f"\nUser {user + 1}: {follow_up}\nAssistant:"

    def system_prompt(self) -> list[int]:
        return self.tokenizer.encode(SYSTEM_PROMPT)

    def first(self, user: int) -> list[int]:
        return self.system_prompt() + self._encode(self.question(user, 0))

    def extend(self, prompt: list[int], answer: list[int], user: int, turn: int) -> list[int]:
        return [*prompt, *answer, *self._encode(self.question(user, turn))]

    def longest_prompt(self, spec: WorkloadSpec) -> int:
        """An upper bound on any prompt's length (answers at their longest)."""
        longest = 0
        for user in range(spec.users):
            n = len(self.first(user))
            for turn in range(1, spec.turns_of(user)):
                n += spec.max_tokens + len(self._encode(self.question(user, turn)))
            longest = max(longest, n)
        return longest


class WorkloadRunner:
    """Runs in the demo's event loop; sends each user's turns in order (users concurrently)
    through one URL, streaming, and records each request's answer (tokens and their
    log-probabilities) and time to first token."""

    def __init__(
        self,
        url: str,
        spec: WorkloadSpec,
        builder: PromptBuilder,
        *,
        timeout_s: float = 120.0,
        on_done: Callable[[RequestRecord], None] | None = None,
    ) -> None:
        self.url = url.rstrip("/") + "/v1/completions"
        self.spec = spec
        self.builder = builder
        self.timeout_s = timeout_s
        self.on_done = on_done
        self._interrupted = False  # SIGINT came during ``run``
        # Ctrl-C is KeyboardInterrupt here (not ignored, as in a shell's background job, nor
        # handled by an embedder): decided before ``asyncio.run`` puts its own handler in
        self._takes_sigint = signal.getsignal(signal.SIGINT) is signal.default_int_handler

    async def run(self) -> list[RequestRecord]:
        """Every request's record, ordered by (turn, user). Ctrl-C (SIGINT, main thread)
        raises ``KeyboardInterrupt`` out of the run: the requests in flight are cancelled and
        no further turn starts, even when a request swallows its cancellation."""
        self._interrupted = False
        with self._sigint_stops(asyncio.get_running_loop(), asyncio.current_task()):
            try:
                async with httpx.AsyncClient(
                    timeout=httpx.Timeout(self.timeout_s, connect=10.0),
                    trust_env=False,
                    limits=httpx.Limits(max_connections=max(8, 2 * self.spec.users)),
                ) as client:
                    per_user = await asyncio.gather(
                        *(self._conversation(client, u) for u in range(self.spec.users))
                    )
            except asyncio.CancelledError:
                if self._interrupted:
                    raise KeyboardInterrupt from None
                raise
        if self._interrupted:
            raise KeyboardInterrupt
        records = [r for conversation in per_user for r in conversation]
        return sorted(records, key=lambda r: (r.turn, r.user))

    @contextlib.contextmanager
    def _sigint_stops(
        self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any] | None
    ) -> Iterator[None]:
        """While the run lasts, SIGINT marks it interrupted and cancels it. A process that
        does not take Ctrl-C as KeyboardInterrupt (SIGINT ignored, as a shell's background
        job starts, or handled by its embedder) is left as it is."""

        def on_sigint() -> None:
            self._interrupted = True
            if task is not None:
                task.cancel()

        if not self._takes_sigint:
            yield
            return
        try:
            loop.add_signal_handler(signal.SIGINT, on_sigint)
        except (ValueError, RuntimeError, NotImplementedError):  # not the main thread
            yield
            return
        try:
            yield
        finally:
            loop.remove_signal_handler(signal.SIGINT)

    async def _conversation(self, client: httpx.AsyncClient, user: int) -> list[RequestRecord]:
        records: list[RequestRecord] = []
        prompt = self.builder.first(user)
        for turn in range(self.spec.turns_of(user)):
            if self._interrupted:
                break
            if turn:
                prompt = self.builder.extend(prompt, list(records[-1].token_ids), user, turn)
            record = await self._complete(client, user, turn, prompt)
            records.append(record)
            if self.on_done is not None:
                self.on_done(record)
            if record.error is not None:
                break  # the next turn would build on an answer we do not have
        return records

    async def _complete(
        self, client: httpx.AsyncClient, user: int, turn: int, prompt: list[int]
    ) -> RequestRecord:
        body = {
            "prompt": prompt,
            "max_tokens": self.spec.max_tokens,
            "temperature": 0.0,
            "stream": True,
            "logprobs": 0,  # the sampled tokens' own log-probabilities: what the oracle checks
        }
        tokens: list[int] = []
        logprobs: list[float] = []
        ttft: float | None = None
        error: str | None = None
        start = time.perf_counter()
        try:
            async with client.stream("POST", self.url, json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    error = f"HTTP {r.status_code}: {r.text[:200]}"
                else:
                    async for event in _sse_payloads(r):
                        if "error" in event:
                            error = str(event["error"].get("message", event["error"]))
                            break
                        choice = event["choices"][0] if event.get("choices") else {}
                        new = choice.get("token_ids") or []
                        if new and ttft is None:
                            ttft = time.perf_counter() - start
                        tokens.extend(new)
                        logprobs.extend((choice.get("logprobs") or {}).get("token_logprobs", []))
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
            error = f"{type(e).__name__}: {e}"  # unreachable, or an answer we cannot read
        latency = time.perf_counter() - start
        return RequestRecord(
            user, turn, tuple(prompt), tuple(tokens), ttft, latency, error, tuple(logprobs)
        )


async def _sse_payloads(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON ``data:`` payloads of an SSE response, until ``[DONE]``."""
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        payload = line.removeprefix("data: ")
        if payload == "[DONE]":
            return
        yield json.loads(payload)


def warm_up(url: str, builder: PromptBuilder, timeout_s: float = 120.0) -> float:
    """One request through ``url`` (the proxy) before the timed workload; its seconds.

    A stack's first request pays one-time costs no later request does (on a GPU: kernel
    compilation and autotuning, CUDA graph capture, the first NIXL handshake): measured in
    the workload they made the p95 TTFT of both stacks ~1 s. Raises ``httpx.HTTPError``
    when the stack does not answer it."""
    body = {"prompt": builder.tokenizer.encode(WARM_UP_TEXT), "max_tokens": 2, "temperature": 0.0}
    start = time.perf_counter()
    url = url.rstrip("/") + "/v1/completions"
    r = httpx.post(url, json=body, timeout=timeout_s, trust_env=False)
    r.raise_for_status()
    return time.perf_counter() - start
