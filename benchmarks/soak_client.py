"""The soak's client: ``config.requests`` completions through the proxy, ``concurrency`` in
flight, some streamed, some cancelled at a random moment; each answer's tokens and their
log-probabilities (``logprobs: 0``) kept for the oracle. A ``Restart`` runs (in a thread) when
its request is sent, while the others go on."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import httpx

from kvbridge.oracle import Trace

if TYPE_CHECKING:
    from benchmarks.soak import SoakConfig

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 60.0  # no answer by then: the soak reports a hang
NO_ANSWER = -1  # Outcome.status of a request that timed out


class Outcome(NamedTuple):
    prompt: int
    label: str
    answer: Trace | None  # None: cancelled, or refused
    status: int | None  # None: cancelled by the client
    ttft: float | None


class Restart(NamedTuple):
    """Run ``action`` (blocking; in a thread) when request ``at`` is sent."""

    at: int
    action: Callable[[], None]


class _HangReport:
    """Logs every thread's stack at the first request that got no answer: what hung."""

    def __init__(self) -> None:
        self.logged = False

    def log(self, why: str) -> None:
        if self.logged:
            return
        self.logged = True
        names = {t.ident: t.name for t in threading.enumerate()}
        stacks = [
            f"--- {names.get(ident, ident)}\n" + "".join(traceback.format_stack(frame))
            for ident, frame in sys._current_frames().items()
        ]
        logger.error("%s; thread stacks:\n%s", why, "\n".join(stacks))


async def _one(
    client: httpx.AsyncClient, k: int, label: str, body: dict[str, Any], hang: _HangReport
) -> Outcome:
    try:
        return await _send(client, k, label, body)
    except httpx.TimeoutException:
        hang.log(f"request {label} got no answer within {REQUEST_TIMEOUT_S:g}s")
        return Outcome(k, label + " timed out", None, NO_ANSWER, None)


async def _send(client: httpx.AsyncClient, k: int, label: str, body: dict[str, Any]) -> Outcome:
    start = time.perf_counter()
    if not body["stream"]:
        r = await client.post("/v1/completions", json=body)
        if r.status_code != 200:
            return Outcome(k, label, None, r.status_code, None)
        return Outcome(k, label, Trace.from_choices([r.json()["choices"][0]]), 200, None)
    choices: list[dict[str, Any]] = []
    ttft = None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return Outcome(k, label, None, r.status_code, None)
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                return Outcome(k, label, None, int(event["error"]["code"]), None)
            if not event["choices"]:
                continue
            choices.append(event["choices"][0])
            if choices[-1]["token_ids"] and ttft is None:
                ttft = time.perf_counter() - start
    return Outcome(k, label, Trace.from_choices(choices), 200, ttft)


async def run_client(
    url: str, config: SoakConfig, prompts: list[list[int]], restart: Restart | None = None
) -> list[Outcome]:
    """Every request's outcome, in the order they were made."""
    rng = random.Random(config.seed + 1)
    gate = asyncio.Semaphore(config.concurrency)
    hang = _HangReport()
    limits = httpx.Limits(max_connections=4 * config.concurrency)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S)
    restarted: list[asyncio.Future[None]] = []
    async with httpx.AsyncClient(
        base_url=url, timeout=timeout, trust_env=False, limits=limits
    ) as c:

        async def run(i: int) -> Outcome:
            k = rng.randrange(len(prompts))
            stream = rng.random() < config.stream_fraction
            cancel_after = rng.uniform(0.0, 0.15) if rng.random() < config.abort_fraction else None
            label = f"#{i} (prompt {k}, {'streamed' if stream else 'plain'})"
            body = {
                "prompt": prompts[k],
                "max_tokens": config.max_tokens,
                "temperature": 0,
                "ignore_eos": True,
                "stream": stream,
                "logprobs": 0,  # each token's own log-probability, for the oracle
            }
            async with gate:
                if restart is not None and i == restart.at:
                    restarted.append(asyncio.ensure_future(asyncio.to_thread(restart.action)))
                if cancel_after is None:
                    return await _one(c, k, label, body, hang)
                try:
                    return await asyncio.wait_for(_one(c, k, label, body, hang), cancel_after)
                except TimeoutError:  # the client gives up and closes its connection
                    return Outcome(k, label + " cancelled", None, None, None)

        outcomes = await asyncio.gather(*(run(i) for i in range(config.requests)))
        await asyncio.gather(*restarted)
        return outcomes
