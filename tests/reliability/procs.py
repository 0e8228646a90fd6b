"""Engines in their own OS processes (real NIXL over UCX), for kill-the-peer fault tests.

``EngineProcess`` spawns a reference engine with a NixlConnector and drives it over a Pipe:
``run(rid, prompt, kind, params)`` adds a request and returns its final output; the process
steps while it has work and answers ``state`` with its pool counts. ``kill()`` is SIGKILL:
no shutdown, no goodbye, as when a host dies.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from multiprocessing.connection import Connection
from typing import Any

from kvbridge.config import TransferConfig
from kvbridge.engine.engine import LLMEngine
from kvbridge.engine.request import RequestOutput
from kvbridge.engine.sampling import SamplingParams
from kvbridge.nixl.transport import XferHandle, XferState
from kvbridge.nixl.wrapper import NixlWrapper
from reliability.pd import engine as build_engine  # the engine pd.expected answers like

SAMPLING = {
    "prefill": SamplingParams(max_tokens=1, ignore_eos=True),
    "greedy": SamplingParams(max_tokens=6, ignore_eos=True),
}
REPLY_TIMEOUT_S = 30.0


class StalledReadNixl(NixlWrapper):
    """Real NIXL whose READs are never posted and so never end ("PROC" forever); heartbeats
    and other notifications still go out."""

    def transfer(self, handle: XferHandle) -> XferState:
        return "PROC"

    def check_xfer_state(self, handle: XferHandle) -> XferState:
        return "PROC"


def stalled_reads(agent_name: str) -> NixlWrapper:
    return StalledReadNixl(agent_name)


def nixl_config(role: str, engine_id: str, extra: dict[str, Any]) -> TransferConfig:
    return TransferConfig(
        kv_connector="NixlConnector",
        kv_role=role,  # type: ignore[arg-type]
        engine_id=engine_id,
        kv_connector_extra_config={"side_channel_port": 0, **extra},
    )


def pool_state(engine: LLMEngine) -> dict[str, int]:
    engine.check_integrity()
    stats = engine.kv_connector_stats
    data: dict[str, Any] = {} if stats is None else dict(stats.data)
    return {
        "free": engine.block_manager.num_free_blocks,
        "total": engine.block_manager.num_blocks,
        "held": engine.scheduler.num_held_requests,
        "busy": int(engine.has_unfinished_requests()),
        "expired": int(data.get("num_kv_expired_reqs", 0)),
        "transfers": int(data.get("num_transfers", 0)),
        "failed": int(data.get("num_failed_transfers", 0) + data.get("num_failed_handshakes", 0)),
    }


def _main(conn: Connection, role: str, engine_id: str, extra: dict[str, Any], stall: bool) -> None:
    if stall:
        extra = {**extra, "nixl_wrapper": stalled_reads}
    engine = build_engine(nixl_config(role, engine_id, extra))
    try:
        conn.send(("ready", pool_state(engine)))
        while True:
            pending = engine.has_unfinished_requests() or engine.has_pending_transfers()
            if conn.poll(0.0 if engine.has_unfinished_requests() else 0.002 if pending else 0.05):
                cmd, *args = conn.recv()
                if cmd == "stop":
                    break
                if cmd == "state":
                    conn.send(("state", pool_state(engine)))
                elif cmd == "run":
                    rid, prompt, kind, params = args
                    engine.add_request(prompt, SAMPLING[kind], rid, params)
            if engine.has_unfinished_requests() or engine.has_pending_transfers():
                for out in engine.step():
                    if out.finished:
                        conn.send(("finished", out))
                engine.check_integrity()
    finally:
        engine.shutdown()
        conn.send(("stopped", None))


class EngineProcess:
    """The test's handle on an engine process."""

    def __init__(
        self, role: str, engine_id: str, extra: dict[str, Any], *, stall_reads: bool = False
    ) -> None:
        ctx = mp.get_context("spawn")
        self.conn, theirs = ctx.Pipe()
        self.proc = ctx.Process(
            target=_main, args=(theirs, role, engine_id, extra, stall_reads), daemon=True
        )
        self.proc.start()
        theirs.close()
        self.initial: dict[str, int] = self._expect("ready")

    def _expect(self, kind: str, timeout_s: float = REPLY_TIMEOUT_S) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.conn.poll(left):
                raise AssertionError(f"engine process sent no {kind!r} within {timeout_s}s")
            got, payload = self.conn.recv()
            if got != kind:
                raise AssertionError(f"engine process sent {got!r}, expected {kind!r}")
            return payload

    def submit(self, rid: str, prompt: list[int], kind: str, params: dict[str, Any] | None) -> None:
        self.conn.send(("run", rid, prompt, kind, params))

    def run(
        self, rid: str, prompt: list[int], kind: str, params: dict[str, Any] | None = None
    ) -> RequestOutput:
        self.submit(rid, prompt, kind, params)
        out: RequestOutput = self._expect("finished")
        assert out.request_id == rid, out
        return out

    def state(self) -> dict[str, int]:
        self.conn.send(("state",))
        state: dict[str, int] = self._expect("state")
        return state

    def kill(self) -> None:
        """SIGKILL, then reap: the peer vanishes mid-whatever."""
        if self.proc.pid is not None and self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)
        self.conn.close()

    def close(self) -> int | None:
        """Stop cleanly (shutdown runs) if alive; the exit code."""
        try:
            if self.proc.is_alive():
                self.conn.send(("stop",))
                self._expect("stopped")
        finally:
            self.proc.join(10)
            if self.proc.is_alive():
                self.kill()
        return self.proc.exitcode
