"""Kill a peer process (SIGKILL) around a real NIXL transfer (UCX, two processes).

Producer killed: before the handshake, between handshake and READ, or with the READ in
flight -> the consumer reports a load error, recomputes the prompt (greedy tokens equal a
monolithic run), stays up, and a restarted producer gets a new handshake. Producer killed
while the consumer idles -> the consumer releases its agent and dlist at once, and the
restarted producer serves the next load. Consumer killed mid-READ with the producer holding
blocks for it -> the producer frees them at the lease expiry. (The hard cap,
``abort_timeout_s``, under live heartbeats: test_faults_nixl.py.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from kvbridge.engine.engine import LLMEngine
from kvbridge.nixl import stats as keys
from kvbridge.nixl.transport import XferHandle, XferState
from kvbridge.nixl.worker import NixlWorker
from kvbridge.nixl.wrapper import NixlWrapper
from reliability.invariants import ResourceLedger, parts, transport_of, wait_until
from reliability.pd import expected, prompt
from reliability.procs import SAMPLING, EngineProcess, build_engine, nixl_config
from support.nixl_marks import needs_nixl

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(120),
    needs_nixl,
]

TIMEOUT_S = 3.0
EXTRA = {
    "transfer_timeout_s": TIMEOUT_S,
    "kv_lease_duration_s": 1.0,
    "heartbeat_interval_s": 0.2,
    "abort_timeout_s": 10.0,
}
DECODE = {"do_remote_decode": True}


def counter(e: LLMEngine, key: str) -> int:
    stats = e.kv_connector_stats
    value = 0 if stats is None else stats.data.get(key, 0)
    assert isinstance(value, int)
    return value


def load_failures(e: LLMEngine) -> int:
    """Failed handshakes, READs and lease confirmations: every way a load can fail."""
    names = ("FAILED_TRANSFERS", "FAILED_HANDSHAKES", "FAILED_CONFIRMS")
    return sum(counter(e, getattr(keys, n)) for n in names if hasattr(keys, n))


def decode(d: LLMEngine, rid: str, p: list[int], params: dict[str, Any] | None) -> Any:
    d.add_request(p, SAMPLING["greedy"], rid, params)
    deadline = time.monotonic() + 4 * TIMEOUT_S
    while True:
        assert time.monotonic() < deadline, f"{rid} never finished"
        for out in d.step():
            if out.finished:
                return out
        d.check_integrity()
        time.sleep(0.001)


@pytest.fixture
def producers() -> Iterator[list[EngineProcess]]:
    """Producer processes of a test; any still alive at the end is stopped cleanly."""
    procs: list[EngineProcess] = []
    yield procs
    for proc in procs:
        if proc.proc.is_alive():
            assert proc.close() == 0


def start_producer(producers: list[EngineProcess], port: int = 0) -> EngineProcess:
    producers.append(EngineProcess("kv_producer", "prefill", {**EXTRA, "side_channel_port": port}))
    return producers[-1]


class KillOnPost(NixlWrapper):
    """Real NIXL that SIGKILLs ``victim`` right after posting the next READ (it is in flight)."""

    victim: EngineProcess | None = None
    posted_states: list[XferState] = []

    def transfer(self, handle: XferHandle) -> XferState:
        state = super().transfer(handle)
        victim, KillOnPost.victim = KillOnPost.victim, None
        if victim is not None:
            KillOnPost.posted_states.append(state)
            victim.kill()
        return state


def consumer(ledger: ResourceLedger, **extra: Any) -> LLMEngine:
    return ledger.track(build_engine(nixl_config("kv_consumer", "decode", {**EXTRA, **extra})))


def assert_recomputed_and_up(d: LLMEngine, p: list[int], out: Any, failures: int) -> None:
    assert out.token_ids == expected(p) and out.error is None
    assert load_failures(d) == failures
    local = prompt(50)
    assert decode(d, "local", local, None).token_ids == expected(local)  # still serving


@pytest.mark.parametrize("when", ["between handshake and READ", "with the READ in flight"])
def test_producer_killed_consumer_recomputes_and_stays_up(
    ledger: ResourceLedger, producers: list[EngineProcess], when: str
) -> None:
    p_proc = start_producer(producers)
    wrapper = {"nixl_wrapper": lambda name: KillOnPost(name)} if "flight" in when else {}
    d = consumer(ledger, **wrapper)
    p1 = prompt(1)
    out1 = decode(d, "d-1", p1, p_proc.run("p-1", p1, "prefill", DECODE).kv_transfer_params)
    assert out1.token_ids == expected(p1) and counter(d, keys.NUM_TRANSFERS) == 1  # attached
    p2 = prompt(2, n=40)
    params = p_proc.run("p-2", p2, "prefill", DECODE).kv_transfer_params
    if "flight" in when:
        KillOnPost.victim, KillOnPost.posted_states = p_proc, []
    else:
        p_proc.kill()
    out2 = decode(d, "d-2", p2, params)
    if "flight" in when:  # killed right after the post: the READ (or its lease check) fails
        assert len(KillOnPost.posted_states) == 1 and KillOnPost.victim is None
    assert not p_proc.proc.is_alive()
    assert_recomputed_and_up(d, p2, out2, failures=1)
    ledger.assert_idle(d)


def test_producer_killed_before_the_handshake_fails_the_load_at_once_then_restarted_serves(
    ledger: ResourceLedger, producers: list[EngineProcess]
) -> None:
    """Its side channel refuses the connection: the load fails at once, not after
    ``transfer_timeout_s`` (60 s here). Checked against a broken build (the handshake ignoring
    the refusal): the decode then outlives its deadline and this test fails."""
    p_proc = start_producer(producers)
    d = consumer(ledger, transfer_timeout_s=60.0)
    p1 = prompt(3)
    params = p_proc.run("p-3", p1, "prefill", DECODE).kv_transfer_params
    p_proc.kill()
    started = time.monotonic()
    out1 = decode(d, "d-3", p1, params)
    assert time.monotonic() - started < 10.0  # a refused connection, not the 60 s timeout
    assert_recomputed_and_up(d, p1, out1, failures=1)
    restarted = start_producer(producers)
    p2 = prompt(4)
    out2 = decode(d, "d-4", p2, restarted.run("p-4", p2, "prefill", DECODE).kv_transfer_params)
    assert out2.token_ids == expected(p2)
    assert counter(d, keys.NUM_TRANSFERS) == 1  # a new handshake, then a READ that worked
    assert_drained(restarted)
    ledger.assert_idle(d)


def test_producer_killed_while_the_consumer_idles_is_released_and_its_restart_serves(
    ledger: ResourceLedger, producers: list[EngineProcess]
) -> None:
    """vLLM #58063: the consumer kept a dead producer's agent and memory registrations until a
    new engine handshook. Here its closed side channel detaches them while the consumer does
    nothing (no step), and the producer restarted under the same engine id and port serves the
    next load with a fresh handshake (not a READ from the dead agent, then a recompute).
    Checked against a broken build (the consumer not watching its producers): the release
    never comes and this test fails."""
    p_proc = start_producer(producers)
    d = consumer(ledger)
    (worker,) = parts(d, NixlWorker)
    transport = transport_of(worker)
    p1 = prompt(20)
    params = p_proc.run("p-20", p1, "prefill", DECODE).kv_transfer_params
    assert params is not None
    assert decode(d, "d-20", p1, params).token_ids == expected(p1)
    # dlists: the cache's and the board READ windows', the producer's blocks' and lease board's
    assert transport.num_remote_agents == 1 and transport.num_live_dlist_handles == 4
    p_proc.kill()
    wait_until(
        lambda: transport.live_counts()[1:] == (2, transport.num_registered_regions, 0),
        timeout_s=10.0,
        what="the dead producer's agent and dlist released by an idle consumer",
    )
    restarted = start_producer(producers, port=params["remote_port"])
    p2 = prompt(21)
    params2 = restarted.run("p-21", p2, "prefill", DECODE).kv_transfer_params
    assert params2 is not None and params2["remote_port"] == params["remote_port"]
    assert decode(d, "d-21", p2, params2).token_ids == expected(p2)
    assert counter(d, keys.NUM_TRANSFERS) == 2 and load_failures(d) == 0
    assert_drained(restarted)
    ledger.assert_idle(d)


def assert_drained(p_proc: EngineProcess) -> None:
    deadline = time.monotonic() + 10
    while True:
        state = p_proc.state()
        if state["free"] == state["total"] and state["held"] == 0 and not state["busy"]:
            return
        assert time.monotonic() < deadline, f"producer never drained: {state}"
        time.sleep(0.02)


def test_producer_frees_blocks_of_a_consumer_killed_mid_read_at_lease_expiry(
    ledger: ResourceLedger,
) -> None:
    """The consumer's READ never ends; it heartbeats until it is killed."""
    lease_s, cap_s = 1.0, 4.0
    extra = {**EXTRA, "kv_lease_duration_s": lease_s, "abort_timeout_s": cap_s}
    p = ledger.track(build_engine(nixl_config("kv_producer", "prefill", extra)))
    d_proc = EngineProcess(
        "kv_consumer", "decode", {**extra, "transfer_timeout_s": 60.0}, stall_reads=True
    )
    try:
        p_prompt = prompt(8)
        p.add_request(p_prompt, SAMPLING["prefill"], "p-8", DECODE)
        params: dict[str, Any] | None = None
        while params is None:
            for out in p.step():
                if out.finished:
                    params = out.kv_transfer_params
        lease_start = time.monotonic()
        d_proc.submit("d-8", p_prompt, "greedy", params)
        while counter(p, keys.NOTIFICATIONS_RECEIVED) < 3:  # heartbeats: the consumer is alive
            assert time.monotonic() - lease_start < 10, "no heartbeats from the consumer"
            p.step()
            time.sleep(0.01)
        since = time.monotonic()
        d_proc.kill()
        while p.has_pending_transfers():
            assert time.monotonic() - since < cap_s + 5, "producer never freed the blocks"
            p.step()
            time.sleep(0.005)
        freed_after = time.monotonic() - since
        held_for = time.monotonic() - lease_start
        # No more heartbeats: the lease lapses one lease after the last one, before the cap.
        assert 0.8 * lease_s <= freed_after <= lease_s + 1.0, freed_after
        assert held_for < cap_s
        assert counter(p, keys.EXPIRED_REQS) == 1
        ledger.assert_idle(p)
    finally:
        if d_proc.proc.is_alive():
            assert d_proc.close() == 0
