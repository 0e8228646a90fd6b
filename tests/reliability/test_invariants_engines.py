"""The resource ledger: a clean P/D run passes it, and each kind of leak it looks for is caught."""

from __future__ import annotations

import threading

import pytest

from kvbridge.config import TransferConfig
from kvbridge.connector.types import BlockStored, IntegrityError
from kvbridge.nixl.transport import LOCAL_AGENT
from kvbridge.nixl.worker import NixlWorker
from kvbridge.offload.scheduler import CPUOffloadScheduler
from reliability.fabric import FaultyFabric
from reliability.invariants import (
    ResourceLedger,
    assert_no_new_threads,
    baseline,
    idle_problems,
    parts,
    transport_of,
)
from reliability.pd import PD, engine, expected, prompt


def test_clean_pd_round_trip_leaves_both_engines_as_they_started(ledger: ResourceLedger) -> None:
    fabric = FaultyFabric()
    pd = PD(fabric)
    ledger.track(pd.p)
    ledger.track(pd.d)
    prompts = {f"r{i}": prompt(i) for i in range(4)}
    reqs = {f"d-{r}": (p, pd.prefill(f"p-{r}", p)) for r, p in prompts.items()}
    finals = pd.decode(reqs)
    for rid, (p, _) in reqs.items():
        assert finals[rid].token_ids == expected(p), rid
        assert finals[rid].num_external_tokens == len(p)  # all of it: P handed its token over
    d_stats = pd.d.kv_connector_stats
    assert d_stats is not None and d_stats.data["num_transfers"] == 4
    assert "num_failed_transfers" not in d_stats.data
    pd.wait_producer_free(timeout_s=5)
    ledger.assert_all_idle()
    stats = pd.p.kv_connector_stats
    assert stats is not None and "num_kv_expired_reqs" not in stats.data  # freed by "done"


def test_held_blocks_and_leases_are_reported_until_released() -> None:
    fabric = FaultyFabric()
    pd = PD(fabric)
    try:
        base = baseline(pd.p)
        pd.prefill("p-1", prompt(1, n=9))
        problems = idle_problems(pd.p, base)
        assert any("requests still live" in p for p in problems)
        assert any("GPU blocks not back" in p for p in problems)
        assert "NixlConnector num_blocks_held_for_remote_decode=3" in problems, problems
        pd.p.step()  # ships the hold to the worker, which starts the lease
        assert "NixlConnector num_live_leases=1" in idle_problems(pd.p, base)
        pd.wait_producer_free(timeout_s=5)  # nobody reads: the lease lapses
        assert idle_problems(pd.p, base) == []
    finally:
        pd.p.shutdown()
        pd.d.shutdown()


def test_a_leaked_transfer_handle_or_dlist_is_reported() -> None:
    fabric = FaultyFabric()
    pd = PD(fabric)
    try:
        base = baseline(pd.d)
        worker = parts(pd.d, NixlWorker)[0]
        t = transport_of(worker)
        regions = worker.registered.regions
        descs = t.get_xfer_descs(regions.block_items()[:2], "DRAM")
        dlist = t.prep_xfer_dlist(LOCAL_AGENT, descs)
        problems = idle_problems(pd.d, base)
        assert problems == ["NixlConnector nixl_num_inflight_dlist_handles=1"]
        t.release_dlist_handle(dlist)
        assert idle_problems(pd.d, base) == []
    finally:
        pd.p.shutdown()
        pd.d.shutdown()
    assert worker.leaked == (0, 0, 0, 0)


def test_a_pinned_cpu_block_is_reported() -> None:
    cfg = TransferConfig(
        kv_connector="SimpleCPUOffloadConnector",
        kv_connector_extra_config={"num_cpu_blocks": 8},
    )
    e = engine(cfg)
    try:
        base = baseline(e)
        e.generate([prompt(5, n=17)], None)  # stores 4 full blocks on the CPU tier
        e.drain()
        (sched,) = parts(e, CPUOffloadScheduler)
        stored = [
            h for ev in e.take_kv_events() if isinstance(ev, BlockStored) for h in ev.block_hashes
        ]
        assert len(stored) == 4 and sched.pool.num_cached == 4
        pinned = sched.pool.prepare_load(stored[:1])  # a pin nobody will drop
        with pytest.raises(IntegrityError, match="pins"):
            idle_problems(e, base)
        sched.pool.complete_load(pinned, success=False)
        assert idle_problems(e, base) == []
    finally:
        e.shutdown()


def test_a_thread_left_running_is_reported() -> None:
    before = {t.ident for t in threading.enumerate()}
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="left-behind", daemon=True)
    thread.start()
    with pytest.raises(AssertionError, match="left-behind"):
        assert_no_new_threads(before, timeout_s=0.1)
    stop.set()
    thread.join()
    assert_no_new_threads(before, timeout_s=1)
