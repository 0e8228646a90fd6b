"""The engine's scheduler half and worker half in two processes, with MultiConnector(NIXL, CPU
offload) on a decode engine (D): the same tokens as the same D in one process.

P (a NIXL producer) and D's scheduler run here; D's worker runs in a spawned process
(``support.split_engine``), connector metadata crossing the pipe through kvbridge's codecs.
D reads prompt A from P over NIXL, then, its GPU prefix cache dropped, A plus a suffix from
its CPU tier. Each answer must equal the in-process D's and a monolithic engine's, the loads
must come from the child named, and nothing may be left held.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

import pytest

import kvbridge
from kvbridge.engine.engine import EngineConfig, LLMEngine
from kvbridge.engine.request import RequestOutput
from kvbridge.engine.sampling import SamplingParams
from support.nixl_marks import needs_nixl
from support.split_engine import SplitEngine, wait

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240), needs_nixl]

BS = 4
D_BLOCKS = 48
MAX_LEN = 128
DEADLINE_S = 60.0
GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)
PREFILL = SamplingParams(max_tokens=1, ignore_eos=True)
PROMPT = [random.Random(1).randrange(256) for _ in range(30)]  # 7 full blocks and 2 tokens
LONGER = [*PROMPT, 7, 7, 7]
NIXL, CPU = "NixlConnector", "SimpleCPUOffloadConnector"


def _decode_config(engine_id: str) -> kvbridge.TransferConfig:
    return kvbridge.TransferConfig.from_dict(
        {
            "kv_connector": "MultiConnector",
            "kv_role": "kv_consumer",
            "engine_id": engine_id,
            "kv_connector_extra_config": {
                "connectors": [
                    {"kv_connector": NIXL, "kv_connector_extra_config": {"transfer_timeout_s": 30}},
                    {"kv_connector": CPU, "kv_connector_extra_config": {"num_cpu_blocks": 64}},
                ]
            },
        }
    )


def _engine(blocks: int, transfer: kvbridge.TransferConfig | None = None) -> LLMEngine:
    config = EngineConfig(
        model="tiny",
        block_size=BS,
        num_gpu_blocks=blocks,
        max_model_len=MAX_LEN,
        kv_transfer_config=transfer,
    )
    return LLMEngine(config)


@pytest.fixture(scope="module")
def producer() -> Iterator[LLMEngine]:
    nixl = {"side_channel_port": 0, "transfer_timeout_s": 30}
    cfg = kvbridge.TransferConfig(
        kv_connector=NIXL,
        kv_role="kv_producer",
        engine_id="prefill",
        kv_connector_extra_config=nixl,
    )
    with _engine(64, cfg) as p:
        yield p


@pytest.fixture(scope="module")
def monolithic() -> list[list[int]]:
    with _engine(64) as m:
        return [out.token_ids for out in m.generate([PROMPT, LONGER], GREEDY)]


def _prefill(p: LLMEngine, rid: str) -> dict[str, Any]:
    p.add_request(PROMPT, PREFILL, rid, {"do_remote_decode": True})
    done: list[RequestOutput] = []
    wait(lambda: bool(done), lambda: done.extend(o for o in p.step() if o.finished), 30, rid)
    assert done[0].kv_transfer_params is not None
    return done[0].kv_transfer_params


def _run(d: Any, p: LLMEngine, rid: str, prompt: list[int], params: Any) -> RequestOutput:
    """Run one request on D to its end, stepping P while it holds blocks; then drain both."""
    d.add_request(prompt, GREEDY, rid, params)
    final: list[RequestOutput] = []

    def poll() -> None:
        final.extend(o for o in d.step() if o.finished)
        if p.has_pending_transfers():
            p.step()
        time.sleep(0.001)

    def drained() -> bool:
        busy = d.has_unfinished_requests() or d.has_pending_transfers()
        return bool(final) and not busy and not p.has_pending_transfers()

    wait(drained, poll, DEADLINE_S, rid)
    return final[0]


def _scenario(d: Any, p: LLMEngine, tag: str) -> tuple[list[RequestOutput], Any]:
    """A over NIXL from P, then A plus a suffix from D's CPU tier; D's outputs and stats."""
    remote = _run(d, p, f"{tag}-a", PROMPT, _prefill(p, f"p-{tag}"))
    d.block_manager.reset_prefix_cache()  # A's KV is now only in D's CPU tier
    local = _run(d, p, f"{tag}-b", LONGER, None)
    return [remote, local], d.take_kv_connector_stats()


def test_split_engine_matches_the_in_process_engine(
    producer: LLMEngine, monolithic: list[list[int]]
) -> None:
    with _engine(D_BLOCKS, _decode_config("decode-1")) as d:
        expected, _ = _scenario(d, producer, "one")
    split = SplitEngine(
        _decode_config("decode-2"), num_blocks=D_BLOCKS, block_size=BS, max_model_len=MAX_LEN
    )
    try:
        got, stats = _scenario(split, producer, "two")
        for rid in ("two-a", "two-b"):
            assert not kvbridge.has_request_state(split.connector, rid)
        assert split.block_manager.num_used_blocks == 0
    finally:
        assert split.shutdown() == 0
    assert [o.token_ids for o in got] == [o.token_ids for o in expected] == monolithic
    # A came over NIXL (every token: P handed its first token over), A + suffix from the CPU
    # tier (7 full blocks).
    assert [o.num_external_tokens for o in got] == [len(PROMPT), 28]
    per_child = stats.per_connector
    assert per_child[NIXL].data["num_transfers"] == 1
    assert per_child[CPU].data["cpu_hit_tokens"] == 28
    assert per_child[CPU].data["loaded_blocks"] == 7
