"""Resource invariants: what an idle engine may still hold, and what must be gone at shutdown.

Idle (``idle_problems``, shared with ``benchmarks.soak``): every GPU block free again, the
CPU tier with no pins and no store in flight, no NIXL lease, load, transfer handle or
per-transfer dlist left (only the KV cache's own dlist and one per attached remote engine),
every pool's ``check_integrity`` clean. After ``shutdown()``: every NIXL transport released
everything it held, and no thread started since the baseline is left running.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from benchmarks.soak_audit import EngineBaseline as Baseline
from benchmarks.soak_audit import connector_parts, idle_problems
from benchmarks.soak_audit import engine_baseline as baseline
from kvbridge.engine.engine import LLMEngine
from kvbridge.nixl.transport import LiveCounts, NixlTransport
from kvbridge.nixl.worker import NixlWorker
from kvbridge.serve.engine_loop import EngineLoop

T = TypeVar("T")
NO_LEAK = LiveCounts(0, 0, 0, 0)


def parts(engine: LLMEngine, kind: type[T]) -> list[T]:
    """The connector parts of ``engine`` (MultiConnector children included) of type ``kind``."""
    return [p for p in connector_parts(engine) if isinstance(p, kind)]


def transport_of(worker: NixlWorker) -> NixlTransport:
    return worker.registered.transport


def wait_until(
    predicate: Callable[[], bool],
    timeout_s: float,
    what: str,
    poll: Callable[[], object] | None = None,
) -> None:
    """Poll ``predicate`` (calling ``poll`` between tries) until true; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s}s")
        if poll is not None:
            poll()
        else:
            time.sleep(0.005)


@dataclass
class _Tracked:
    engine: LLMEngine
    loop: EngineLoop | None  # the thread that owns the engine, if not the test's
    base: Baseline | None = None

    def run(self, fn: Callable[[LLMEngine], T]) -> T:
        return fn(self.engine) if self.loop is None else self.loop.call(fn)


class ResourceLedger:
    """Runs in a test; records engines' starting resources and proves they come back.

    ``track`` an engine right after building it (with its ``EngineLoop`` when a server owns
    it); ``assert_idle`` waits for it to settle and checks what it holds; ``close`` shuts the
    test's own engines down and checks what every transport and thread left behind.
    """

    def __init__(self) -> None:
        self.threads_before = {t.ident for t in threading.enumerate()}
        self._tracked: list[_Tracked] = []

    def track(self, engine: LLMEngine, loop: EngineLoop | None = None) -> LLMEngine:
        entry = _Tracked(engine, loop)
        entry.base = entry.run(baseline)
        self._tracked.append(entry)
        return engine

    def _entry(self, engine: LLMEngine) -> _Tracked:
        for entry in self._tracked:
            if entry.engine is engine:
                return entry
        raise KeyError("engine is not tracked")

    def assert_idle(self, engine: LLMEngine, timeout_s: float = 10.0) -> None:
        """Step (or wait for) ``engine`` until nothing is pending, then check what it holds."""
        entry = self._entry(engine)
        if entry.loop is None:
            engine.drain(timeout_s=timeout_s)
        else:
            wait_until(lambda: not entry.run(_busy), timeout_s, "engine idle", poll=_short_sleep)
        base = entry.base
        assert base is not None
        problems = entry.run(lambda e: idle_problems(e, base))
        assert not problems, problems

    def assert_all_idle(self) -> None:
        for entry in self._tracked:
            self.assert_idle(entry.engine)

    def close(self, *, thread_timeout_s: float = 10.0) -> None:
        """Check the test-owned engines idle and shut them down (server-owned ones must be
        shut down by their server by now), then check transports and threads."""
        try:
            for entry in self._tracked:
                if entry.loop is None:
                    self.assert_idle(entry.engine)
        finally:
            for entry in self._tracked:
                if entry.loop is None:
                    entry.engine.shutdown()
        for entry in self._tracked:
            for worker in parts(entry.engine, NixlWorker):
                assert worker.leaked == NO_LEAK, f"{worker.agent_name} leaked {worker.leaked}"
        assert_no_new_threads(self.threads_before, thread_timeout_s)


def _busy(engine: LLMEngine) -> bool:
    return engine.has_unfinished_requests() or engine.has_pending_transfers()


def _short_sleep() -> None:
    time.sleep(0.01)


def new_threads(before: set[int | None]) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]


def assert_no_new_threads(before: set[int | None], timeout_s: float = 10.0) -> None:
    """No thread started since ``before`` is still alive (they may take a poll to exit)."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = new_threads(before)
        if not left:
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                "threads left running: " + ", ".join(f"{t.name} (daemon={t.daemon})" for t in left)
            )
        time.sleep(0.02)
