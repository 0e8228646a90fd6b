"""NIXL faults between a producer and a consumer engine: no hang, no leak, correct answers.

Each test injects one fault class through the linked FakeNixlWrappers (transfer ERR on poll
or post, a failing transport call, lost notifications, a stuck READ, a crashed producer),
then checks the decode engine's greedy tokens against a monolithic run and both engines
against the resource ledger (blocks, leases, handles, dlists, threads).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from kvbridge.engine.engine import LLMEngine
from kvbridge.nixl import stats as keys
from kvbridge.nixl.fake import FakeNixlWrapper
from reliability.fabric import FaultyFabric
from reliability.invariants import ResourceLedger
from reliability.pd import FAST, GREEDY, PD, engine, expected, nixl, prompt


def counter(e: LLMEngine, key: str) -> int:
    stats = e.kv_connector_stats
    value = 0 if stats is None else stats.data.get(key, 0)
    assert isinstance(value, int)
    return value


def failures(e: LLMEngine) -> int:
    return counter(e, keys.FAILED_TRANSFERS) + counter(e, keys.FAILED_HANDSHAKES)


def run_one(pd: PD, seed: int) -> tuple[list[int], object]:
    p = prompt(seed)
    params = pd.prefill(f"p-{seed}", p)
    out = pd.decode({f"d-{seed}": (p, params)})[f"d-{seed}"]
    return p, out


Inject = Callable[[FakeNixlWrapper], None]
FAULTS: dict[str, tuple[Inject, bool]] = {
    # name: (inject into the consumer's transport, does the producer hear the release?)
    "ERR when polled": (lambda t: t.fail_next_xfers(1), True),
    "ERR when posted": (lambda t: t.fail_next_xfers(1, on_post=True), True),
    "check_xfer_state raises": (lambda t: t.fail_next_call("check_xfer_state"), True),
    "make_prepped_xfer raises": (lambda t: t.fail_next_call("make_prepped_xfer"), True),
    "add_remote_agent raises": (lambda t: t.fail_next_call("add_remote_agent"), False),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_failed_load_is_recomputed_and_both_sides_free_their_blocks(
    ledger: ResourceLedger, fault: str
) -> None:
    inject, released = FAULTS[fault]
    fabric = FaultyFabric()
    pd = PD(fabric)
    ledger.track(pd.p)
    ledger.track(pd.d)
    inject(fabric.agent_of("decode"))
    p, out = run_one(pd, seed=1)
    assert out.token_ids == expected(p) and out.error is None  # recomputed, correct
    assert failures(pd.d) == 1 and counter(pd.d, keys.NUM_TRANSFERS) == 0
    took = pd.wait_producer_free(timeout_s=5)
    expired = counter(pd.p, keys.EXPIRED_REQS)
    if released:  # the consumer's "release" frees the blocks at once
        assert expired == 0 and took < FAST["kv_lease_duration_s"]
    else:  # never attached, so it cannot notify: the lease lapses
        assert expired == 1
    failed, done = failures(pd.d), counter(pd.d, keys.NUM_TRANSFERS)
    p2, out2 = run_one(pd, seed=2)  # the next load goes through (fresh handshake if needed)
    assert out2.token_ids == expected(p2)
    assert failures(pd.d) == failed and counter(pd.d, keys.NUM_TRANSFERS) == done + 1
    pd.wait_producer_free(timeout_s=5)
    ledger.assert_all_idle()


def test_policy_fail_ends_the_request_with_the_cause_and_frees_everything(
    ledger: ResourceLedger,
) -> None:
    fabric = FaultyFabric()
    pd = PD(fabric, policy="fail")
    ledger.track(pd.p)
    ledger.track(pd.d)
    fabric.agent_of("decode").fail_next_xfers(1)
    _, out = run_one(pd, seed=3)
    assert out.finish_reason == "error"
    assert out.error is not None and "KV load failed" in out.error
    assert "kv_load_failure_policy=fail" in out.error
    pd.wait_producer_free(timeout_s=5)
    ledger.assert_all_idle()


def test_lost_done_notification_frees_the_producer_at_lease_expiry(
    ledger: ResourceLedger,
) -> None:
    fabric = FaultyFabric()
    pd = PD(fabric)
    ledger.track(pd.p)
    ledger.track(pd.d)
    fabric.drop("done")
    p, out = run_one(pd, seed=4)
    assert out.token_ids == expected(p) and counter(pd.d, keys.NUM_TRANSFERS) == 1
    pd.wait_producer_free(timeout_s=5)
    assert counter(pd.p, keys.EXPIRED_REQS) == 1  # freed by the lapse, not by a message
    assert fabric.num_dropped >= 1
    ledger.assert_all_idle()


def test_every_notification_lost_after_an_err_still_frees_both_sides(
    ledger: ResourceLedger,
) -> None:
    fabric = FaultyFabric()
    pd = PD(fabric)
    ledger.track(pd.p)
    ledger.track(pd.d)
    fabric.drop("done", "heartbeat", "release")
    fabric.agent_of("decode").fail_next_xfers(1)
    p, out = run_one(pd, seed=5)
    assert out.token_ids == expected(p)
    pd.wait_producer_free(timeout_s=5)
    assert counter(pd.p, keys.EXPIRED_REQS) == 1
    assert counter(pd.p, keys.NOTIFICATIONS_RECEIVED) == 0
    ledger.assert_all_idle()


def test_heartbeats_cannot_hold_blocks_past_abort_timeout(ledger: ResourceLedger) -> None:
    """A consumer stuck in its READ keeps renewing the lease; the hard cap still frees it."""
    cap = {
        "kv_lease_duration_s": 0.4,
        "heartbeat_interval_s": 0.1,
        "abort_timeout_s": 1.0,
        "transfer_timeout_s": 2.5,
    }
    fabric = FaultyFabric()
    pd = PD(fabric, **cap)
    ledger.track(pd.p)
    ledger.track(pd.d)
    fabric.drop("release")
    fabric.agent_of("decode").cycles_before_xfer_done = 10**9  # the READ never ends
    p = prompt(6)
    params = pd.prefill("p-6", p)
    start = time.monotonic()
    pd.d.add_request(p, GREEDY, "d-6", params)
    freed_at = None
    while pd.d.has_unfinished_requests():
        assert time.monotonic() - start < 10, "consumer never gave up its READ"
        outs = pd.d.step()
        if pd.p.has_pending_transfers():
            pd.p.step()
        elif freed_at is None:
            freed_at = time.monotonic() - start
        for out in outs:
            if out.finished:
                assert out.token_ids == expected(p)  # timed out, recomputed
        time.sleep(0.002)
    assert freed_at is not None
    assert cap["abort_timeout_s"] * 0.9 <= freed_at < cap["transfer_timeout_s"]
    assert counter(pd.p, keys.EXPIRED_REQS) == 1
    assert counter(pd.p, keys.NOTIFICATIONS_RECEIVED) >= 3  # heartbeats did arrive
    assert counter(pd.d, keys.FAILED_TRANSFERS) == 1
    ledger.assert_all_idle()


def test_derived_heartbeats_keep_a_short_lease_alive_through_a_long_read(
    ledger: ResourceLedger,
) -> None:
    """Only ``kv_lease_duration_s`` is set (1.5 s; once refused against the 5 s default
    heartbeat): the consumer beats every 0.5 s, derived from the lease the producer announced,
    and a READ lasting 2.5 leases still lands. Checked against a broken build (the derived
    heartbeat fixed at 5 s): the lease lapses mid-READ and this test fails."""
    lease = {"kv_lease_duration_s": 1.5, "heartbeat_interval_s": None}
    timeouts = {"abort_timeout_s": 20.0, "transfer_timeout_s": 10.0}
    fabric = FaultyFabric()
    pd = PD(fabric, **lease, **timeouts)
    ledger.track(pd.p)
    ledger.track(pd.d)
    consumer = fabric.agent_of("decode")
    consumer.cycles_before_xfer_done = 10**9  # the READ runs until released below
    p = prompt(13)
    params = pd.prefill("p-13", p)
    pd.d.add_request(p, GREEDY, "d-13", params)
    start, out = time.monotonic(), None
    while out is None:
        elapsed = time.monotonic() - start
        assert elapsed < 15, "the load never ended"
        if elapsed > 2.5 * lease["kv_lease_duration_s"]:
            consumer.cycles_before_xfer_done = 0
        out = next((o for o in pd.d.step() if o.finished), None)
        pd.p.step()
        time.sleep(0.002)
    assert out.token_ids == expected(p) and out.error is None
    assert counter(pd.d, keys.NUM_TRANSFERS) == 1 and failures(pd.d) == 0
    assert counter(pd.d, keys.FAILED_CONFIRMS) == 0
    assert counter(pd.p, keys.EXPIRED_REQS) == 0
    assert counter(pd.p, keys.NOTIFICATIONS_RECEIVED) >= 6  # heartbeats, then "done"
    pd.wait_producer_free(timeout_s=5)
    ledger.assert_all_idle()


def test_client_abort_mid_read_holds_blocks_until_the_read_ends(ledger: ResourceLedger) -> None:
    fabric = FaultyFabric()
    pd = PD(fabric)
    ledger.track(pd.p)
    ledger.track(pd.d)
    consumer = fabric.agent_of("decode")
    consumer.cycles_before_xfer_done = 10**9
    p = prompt(7)
    params = pd.prefill("p-7", p)
    pd.d.add_request(p, GREEDY, "d-7", params)
    deadline = time.monotonic() + 5
    while consumer.num_live_xfer_handles == 0:  # the READ is posted and in flight
        assert time.monotonic() < deadline
        pd.d.step()
    assert pd.d.abort_request("d-7")
    for _ in range(20):
        pd.d.step()
    held = pd.d.block_manager.num_blocks - pd.d.block_manager.num_free_blocks
    assert held > 0 and pd.d.has_pending_transfers()  # nothing is freed under a live READ
    consumer.cycles_before_xfer_done = 0  # the READ completes
    ledger.assert_idle(pd.d)
    pd.wait_producer_free(timeout_s=5)
    ledger.assert_all_idle()


def _crash_after_attach(
    ledger: ResourceLedger, pd: PD, fabric: FaultyFabric, when: str
) -> tuple[list[int], object]:
    """Attach the producer with one good load, hold a second prompt, crash the producer
    (``when``: "before READ" or "mid READ"), decode the second; (prompt, its output)."""
    p1, out1 = run_one(pd, seed=8)
    assert out1.token_ids == expected(p1) and counter(pd.d, keys.NUM_TRANSFERS) == 1
    pd.wait_producer_free(timeout_s=5)
    p2 = prompt(9)
    params = pd.prefill("p-9", p2)
    producer_agent = fabric.agent_of("prefill").agent_name
    if when == "before READ":
        fabric.crash(producer_agent)
        pd.p.shutdown()
        pd.p = ledger.track(engine())  # what the consumer's loop steps besides itself
        return p2, pd.decode({"d-9": (p2, params)})["d-9"]
    consumer = fabric.agent_of("decode")
    consumer.cycles_before_xfer_done = 10**9
    pd.d.add_request(p2, GREEDY, "d-9", params)
    deadline = time.monotonic() + 5
    while consumer.num_live_xfer_handles == 0:
        assert time.monotonic() < deadline
        pd.d.step()
    fabric.crash(producer_agent)
    consumer.cycles_before_xfer_done = fabric.cycles_before_xfer_done
    pd.p.shutdown()
    pd.p = ledger.track(engine())
    out2 = None
    while out2 is None:
        assert time.monotonic() < deadline + 5, "the consumer never ended its READ"
        out2 = next((o for o in pd.d.step() if o.finished), None)
    return p2, out2


@pytest.mark.parametrize("when", ["before READ", "mid READ"])
def test_crashed_producer_fails_the_load_and_the_consumer_recomputes(
    ledger: ResourceLedger, when: str
) -> None:
    fabric = FaultyFabric()
    pd = PD(fabric)
    ledger.track(pd.d)
    p2, out2 = _crash_after_attach(ledger, pd, fabric, when)
    assert out2.token_ids == expected(p2) and out2.error is None  # recomputed, correct
    assert failures(pd.d) == 1  # the READ, or (its closed side channel seen first) the handshake
    local = pd.decode({"local": (prompt(11), None)})["local"]  # the consumer stays up
    assert local.token_ids == expected(prompt(11))
    ledger.assert_idle(pd.d)


@pytest.mark.parametrize(
    "when",
    ["before READ", "mid READ"],
)
def test_restarted_producer_is_handshaken_afresh_and_serves(
    ledger: ResourceLedger, when: str
) -> None:
    fabric = FaultyFabric()
    pd = PD(fabric)
    ledger.track(pd.d)
    _crash_after_attach(ledger, pd, fabric, when)
    restarted = ledger.track(engine(nixl("kv_producer", "prefill", fabric)))
    for seed in (10, 12):
        p = prompt(seed)
        params = pd.prefill(f"p-{seed}", p, engine=restarted)
        out = pd.decode({f"d-{seed}": (p, params)}, producer=restarted)[f"d-{seed}"]
        assert out.token_ids == expected(p)
        pd.wait_producer_free(timeout_s=5, engine=restarted)
    assert counter(pd.d, keys.NUM_TRANSFERS) == 3  # the first load and both after the restart
    assert failures(pd.d) == 1  # only the crash
    assert counter(restarted, keys.EXPIRED_REQS) == 0  # released by "done", not a lapse
    ledger.assert_all_idle()


def test_many_requests_with_some_reads_failing_all_answer_correctly(
    ledger: ResourceLedger,
) -> None:
    fabric = FaultyFabric(cycles_before_xfer_done=2)
    pd = PD(fabric, kv_lease_duration_s=10.0, abort_timeout_s=20.0)  # ten prefills, then reads
    ledger.track(pd.p)
    ledger.track(pd.d)
    prompts = {f"r{i}": prompt(100 + i) for i in range(10)}
    reqs = {f"d-{r}": (p, pd.prefill(f"p-{r}", p)) for r, p in prompts.items()}
    consumer = fabric.agent_of("decode")
    consumer.fail_next_xfers(2)
    consumer.fail_next_xfers(2, on_post=True)
    finals = pd.decode(reqs)
    for rid, (p, _) in reqs.items():
        assert finals[rid].token_ids == expected(p), rid
    assert counter(pd.d, keys.FAILED_TRANSFERS) == 4
    assert counter(pd.d, keys.NUM_TRANSFERS) == 6
    pd.wait_producer_free(timeout_s=5)
    assert counter(pd.p, keys.EXPIRED_REQS) == 0
    ledger.assert_all_idle()
