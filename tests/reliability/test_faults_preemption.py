"""A preempted request must not block requests that already hold their loaded KV.

The soak found this deadlock on the decode engine: a request preempted for lack of blocks
goes back to the head of the queue; requests behind it finished their remote loads and hold
their blocks while they wait to compute their last prompt token; nothing runs, so the head
never gets its blocks and the loaded requests are never scheduled.
"""

from __future__ import annotations

import time

from kvbridge.engine.engine import EngineConfig, LLMEngine
from kvbridge.engine.request import RequestOutput
from kvbridge.engine.sampling import SamplingParams
from reliability.fabric import FaultyFabric
from reliability.invariants import ResourceLedger
from reliability.pd import BS, GREEDY, PD, expected, nixl, prompt

SLOW = {"kv_lease_duration_s": 10.0, "abort_timeout_s": 20.0, "transfer_timeout_s": 10.0}
LONG = SamplingParams(max_tokens=8, ignore_eos=True)


def test_loaded_requests_run_while_a_preempted_one_waits_for_blocks(
    ledger: ResourceLedger,
) -> None:
    fabric = FaultyFabric(cycles_before_xfer_done=0)
    pd = PD(fabric, **SLOW)
    pd.d.shutdown()
    consumer = nixl("kv_consumer", "decode2", fabric, **SLOW)
    pd.d = LLMEngine(
        EngineConfig(model="tiny", block_size=BS, num_gpu_blocks=16, kv_transfer_config=consumer)
    )
    ledger.track(pd.p)
    ledger.track(pd.d)
    d = pd.d
    long = prompt(1, n=9 * BS)  # 10 of the 16 blocks once it samples; its 41st token needs more
    d.add_request(long, LONG, "long")
    d.step()
    # 3 blocks each (with the first token P hands over): all 16 used
    short = {f"s{i}": prompt(10 + i, n=3 * BS - 1) for i in range(2)}
    params = {rid: pd.prefill(f"p-{rid}", p) for rid, p in short.items()}
    reader = fabric.agent_of("decode2")
    reader.cycles_before_xfer_done = 10**9  # both loads stay in flight...
    for rid, p in short.items():
        d.add_request(p, GREEDY, rid, params[rid])
    finals: dict[str, RequestOutput] = {}
    deadline = time.monotonic() + 20
    while len(finals) < 3:
        assert time.monotonic() < deadline, (
            f"stuck: {[(r.request_id, r.status.value) for r in d.scheduler.requests.values()]}, "
            f"{d.block_manager.num_free_blocks} blocks free"
        )
        finals.update((o.request_id, o) for o in d.step() if o.finished)
        pd.p.step()
        if d.scheduler.num_preemptions:  # ...until "long" was preempted for lack of blocks
            reader.cycles_before_xfer_done = 0
        time.sleep(0.001)
    assert d.scheduler.num_preemptions >= 1
    for rid, p in short.items():
        assert finals[rid].token_ids == expected(p), rid
    with LLMEngine(EngineConfig(model="tiny", block_size=BS, num_gpu_blocks=64)) as mono:
        assert finals["long"].token_ids == mono.generate([long], LONG)[0].token_ids
    pd.wait_producer_free(timeout_s=5)
    ledger.assert_all_idle()
