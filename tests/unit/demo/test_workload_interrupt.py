"""Ctrl-C during the demo's workload stops it with ``KeyboardInterrupt`` (exit 130), even when
a request swallows its cancellation the way a shielded HTTP clean-up can: CI once saw the demo
run to its end (exit 0) after a SIGINT."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from kvbridge.demo.workload import PromptBuilder, RequestRecord, WorkloadRunner, WorkloadSpec


class _Tokens:
    """Fault-injection stand-in for the server's tokenizer: one id per character."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 256 for c in text]


def _runner(turns: int) -> tuple[WorkloadRunner, list[int]]:
    spec = WorkloadSpec.build(users=2, turns=turns, requests=None, max_tokens=4)
    runner = WorkloadRunner("http://127.0.0.1:9", spec, PromptBuilder(_Tokens(), None))  # type: ignore[arg-type]
    started: list[int] = []

    async def swallows_cancel(client: Any, user: int, turn: int, prompt: list[int]) -> Any:
        started.append(turn)
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:  # the request's library eats the cancellation
            pass
        return RequestRecord(user, turn, tuple(prompt), (1,), 0.01, 0.05)

    runner._complete = swallows_cancel  # type: ignore[method-assign]
    return runner, started


@pytest.fixture
def ctrl_c_interrupts() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt here (as at a terminal), even when the tests run as a
    shell's background job, which starts with SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("ctrl_c_interrupts")
def test_sigint_stops_a_run_whose_requests_swallow_the_cancellation() -> None:
    runner, started = _runner(turns=200)  # 10 s of turns if nothing stops them
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            asyncio.run(runner.run())
    finally:
        timer.cancel()
    assert 0 < len(started) < 40  # stopped within a turn of the signal (0.3 s, 0.05 s a turn)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_a_process_that_ignores_sigint_keeps_ignoring_it_through_a_run() -> None:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        runner, _ = _runner(turns=2)
        timer = threading.Timer(0.02, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        records = asyncio.run(runner.run())  # not interrupted
        timer.join()
        assert len(records) == 4 and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_run_without_a_signal_returns_every_record() -> None:
    runner, started = _runner(turns=3)
    records = asyncio.run(runner.run())
    assert [(r.turn, r.user) for r in records] == [(t, u) for t in range(3) for u in range(2)]
    assert len(started) == 6
