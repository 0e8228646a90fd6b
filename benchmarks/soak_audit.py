"""The soak's audits, shared with tests/reliability: what an idle engine still holds, and which
log lines a run wrote that it should not have."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

from kvbridge.connector.gauges import connector_gauges, nonzero
from kvbridge.engine.engine import LLMEngine
from kvbridge.nixl.worker import NixlWorker


class EngineBaseline(NamedTuple):
    free_blocks: int


def connector_parts(engine: LLMEngine) -> list[Any]:
    """Both connector halves of ``engine`` and, for a MultiConnector, all their children."""
    out: list[Any] = []
    todo = [engine.worker_connector, engine.scheduler_connector]
    while todo:
        part = todo.pop()
        if part is not None:
            out.append(part)
            todo.extend(reversed(getattr(part, "children", None) or []))
    return out


def engine_baseline(engine: LLMEngine) -> EngineBaseline:
    return EngineBaseline(engine.block_manager.num_free_blocks)


def idle_problems(engine: LLMEngine, base: EngineBaseline) -> list[str]:
    """What an engine with nothing to do still holds (empty: clean); integrity errors raise.

    Connector leaks are read from the connectors' own gauges, as ``/metrics`` exports them."""
    engine.check_integrity()
    out: list[str] = []
    if engine.has_unfinished_requests() or engine.has_pending_transfers():
        out.append(f"requests still live: {sorted(engine.scheduler.requests)[:8]}")
    if engine.block_manager.num_free_blocks != base.free_blocks:
        lost = base.free_blocks - engine.block_manager.num_free_blocks
        out.append(f"{lost} GPU blocks not back in the free pool")
    transfer = engine.config.kv_transfer_config
    name = transfer.kv_connector if transfer is not None else "none"
    out += nonzero(connector_gauges(name, engine.scheduler_connector, engine.worker_connector))
    for part in connector_parts(engine):
        if isinstance(part, NixlWorker):
            part.check_integrity()
    return out


class LogAudit(logging.Handler):
    """Collects every WARNING-or-worse record while installed; ``expected`` WARNINGs (by
    pattern) are allowed, anything else, or anything at ERROR, is ``unexpected``."""

    def __init__(self, expected: Sequence[re.Pattern[str]]) -> None:
        super().__init__(logging.WARNING)
        self.expected = tuple(expected)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def unexpected(self) -> list[str]:
        return [
            f"{r.levelname} {r.name}: {r.getMessage()[:200]}"
            for r in self.records
            if r.levelno >= logging.ERROR
            or not any(p.search(r.getMessage()) for p in self.expected)
        ]

    def count(self, pattern: re.Pattern[str]) -> int:
        return sum(1 for r in self.records if pattern.search(r.getMessage()))
