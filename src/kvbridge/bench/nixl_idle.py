"""An idle NIXL agent's CPU, for ``kvbridge bench nixl``: one agent in a fresh process.

The child builds a ``NixlWrapper`` (UCX, the given progress-thread delay), registers 1 MiB of
host memory, settles for half a second, then reports the process's CPU time (``getrusage``:
every thread, NIXL's progress thread included) over ``seconds`` of doing nothing.
"""

from __future__ import annotations

import time
from multiprocessing import Pipe
from multiprocessing.connection import Connection

from kvbridge.bench.harness import expect, reap, spawn
from kvbridge.bench.nixl_peer import cpu_seconds

SETTLE_S = 0.5


def _idle_main(conn: Connection, delay_us: int, seconds: float) -> None:
    import torch

    from kvbridge.nixl.wrapper import NixlWrapper

    agent = NixlWrapper(f"bench-idle-{delay_us}", progress_delay_us=delay_us)
    memory = torch.zeros(1 << 18)  # 1 MiB
    try:
        reg = agent.get_reg_descs([(memory.data_ptr(), memory.nbytes, 0)], "DRAM")
        agent.register_memory(reg)
        time.sleep(SETTLE_S)
        cpu0, wall0 = cpu_seconds(), time.perf_counter()
        time.sleep(seconds)
        share = (cpu_seconds() - cpu0) / (time.perf_counter() - wall0)
        agent.deregister_memory(reg)
    finally:
        agent.close()
    conn.send(("idle", share))


def idle_core_share(delay_us: int, seconds: float) -> float:
    """The share of one core an idle agent with ``delay_us`` uses (1.0: a whole core)."""
    mine, theirs = Pipe()
    proc = spawn(_idle_main, theirs, delay_us, seconds)
    theirs.close()
    try:
        share: float = expect(mine, "idle", seconds + 60)
        return share
    finally:
        reap([proc], 10)
