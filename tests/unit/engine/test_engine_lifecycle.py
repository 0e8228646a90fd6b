"""LLMEngine lifecycle: aborts on every path, rejection, config validation, shutdown."""

from __future__ import annotations

import engine_fake_connector as fc
import pytest
from engine_helpers import GREEDY, engine, prompt, reference_kv, run, scripted

from kvbridge.config import ConfigError
from kvbridge.connector.stats import KVConnectorStats
from kvbridge.engine.engine import EngineConfig, LLMEngine
from kvbridge.engine.request import RequestStatus
from kvbridge.engine.sampling import SamplingParams


def _recorded_engine(
    engine_kw: dict[str, object] | None = None, **extra: object
) -> tuple[LLMEngine, str]:
    cfg = scripted(**extra)
    probe = cfg.extra("log")
    cfg.kv_connector_extra_config["probe"] = probe
    eng = engine(kv_transfer_config=cfg, **(engine_kw or {}))
    fc.PROBES[probe] = eng.block_manager.has_blocks
    return eng, probe


def _finished_calls(log: str, rid: str) -> list[tuple[str, list[int], bool]]:
    return [d for _, h, d in fc.LOGS[log] if h == "request_finished" and d[0] == rid]


def _abort_and_check(eng: LLMEngine, log: str, rid: str, had_blocks: bool) -> None:
    status = eng.scheduler.requests[rid].status
    assert eng.abort_request(rid), status
    outs = {o.request_id: o for o in eng.step()}
    assert outs[rid].finished and outs[rid].finish_reason == "abort"
    calls = _finished_calls(log, rid)
    assert len(calls) == 1 and bool(calls[0][1]) == had_blocks and calls[0][2] == had_blocks
    assert not eng.block_manager.has_blocks(rid)
    eng.check_integrity()


def test_abort_waiting_and_running_requests_free_blocks_once() -> None:
    eng, log = _recorded_engine({"max_num_seqs": 1})
    running = eng.add_request(prompt(10), GREEDY)
    waiting = eng.add_request(prompt(11, seed=1), GREEDY)
    eng.step()
    assert eng.scheduler.requests[waiting].status is RequestStatus.WAITING
    _abort_and_check(eng, log, waiting, had_blocks=False)
    assert eng.scheduler.requests[running].status is RequestStatus.RUNNING
    _abort_and_check(eng, log, running, had_blocks=True)
    assert not eng.abort_request(running) and not eng.abort_request("nope")
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    assert not eng.has_unfinished_requests()


def test_abort_preempted_request_frees_nothing_twice() -> None:
    eng, log = _recorded_engine({"num_gpu_blocks": 8, "max_model_len": 32})
    ids = [eng.add_request(prompt(12, seed=s), GREEDY) for s in range(3)]
    victim = None
    for _ in range(50):
        eng.step()
        eng.check_integrity()
        live = [eng.scheduler.requests[r] for r in ids if r in eng.scheduler.requests]
        preempted = [r.request_id for r in live if r.status is RequestStatus.PREEMPTED]
        if preempted:
            victim = preempted[0]
            break
    assert victim is not None
    _abort_and_check(eng, log, victim, had_blocks=False)
    run(eng)
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_abort_after_load_before_schedule_frees_the_loaded_blocks() -> None:
    p = prompt(14, seed=3)
    fc.STORES["lc"] = {tuple(p): reference_kv(p)}
    eng, log = _recorded_engine(store="lc", load_async=True)
    rid = eng.add_request(p, GREEDY)
    # one pass (engine.step would go on and schedule it in the same step): admitted, parked;
    # the load reports done in that pass
    sched = eng.scheduler.schedule()
    eng.scheduler.update_from_output(sched, eng.worker.execute(sched))
    request = eng.scheduler.requests[rid]
    assert request.status is RequestStatus.WAITING and eng.block_manager.has_blocks(rid)
    assert request.num_computed_tokens == len(p) - 1
    _abort_and_check(eng, log, rid, had_blocks=True)
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_abort_of_a_finished_request_holding_blocks_is_a_no_op() -> None:
    eng, log = _recorded_engine(delay_free=True, send_steps=2)
    rid = eng.add_request(prompt(8), SamplingParams(max_tokens=1))
    eng.step()
    assert eng.has_pending_transfers()
    assert not eng.abort_request(rid)
    eng.drain(timeout_s=10)
    assert len(_finished_calls(log, rid)) == 1
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_too_long_prompt_is_rejected_through_request_finished() -> None:
    eng, log = _recorded_engine()
    rid = eng.add_request(prompt(129), GREEDY)  # max_model_len is 128
    outs = eng.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [(rid, "rejected")]
    assert outs[0].error is not None and "max_model_len" in outs[0].error
    assert len(_finished_calls(log, rid)) == 1
    assert not eng.has_unfinished_requests()


def test_add_request_validates_tokens_and_ids() -> None:
    eng = engine()
    with pytest.raises(ValueError, match="prompt_token_ids"):
        eng.add_request([], GREEDY)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        eng.add_request([1, 512], GREEDY)
    eng.add_request([1, 2], GREEDY, request_id="x")
    with pytest.raises(ValueError, match="request_id"):
        eng.add_request([1, 2], GREEDY, request_id="x")


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"block_size": 0}, "block_size"),
        ({"num_gpu_blocks": -1}, "num_gpu_blocks"),
        ({"max_num_seqs": True}, "max_num_seqs"),
        ({"dtype": "int8"}, "dtype"),
        ({"model": "no-such-model"}, "model"),
        ({"hash_algo": "md5"}, "hash_algo"),
        ({"enable_prefix_caching": 1}, "enable_prefix_caching"),
        ({"kv_transfer_config": {"kv_connector": "NoOpConnector"}}, "kv_transfer_config"),
    ],
)
def test_engine_config_errors_name_the_key(kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        EngineConfig(**kwargs)  # type: ignore[arg-type]


def test_max_model_len_beyond_the_cache_is_refused() -> None:
    with pytest.raises(ConfigError, match="max_model_len"):
        LLMEngine(EngineConfig(block_size=4, num_gpu_blocks=4, max_model_len=17))
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        LLMEngine(
            EngineConfig(max_num_batched_tokens=8, max_model_len=64, enable_chunked_prefill=False)
        )


def test_shutdown_is_idempotent_and_stats_are_collected() -> None:
    eng, log = _recorded_engine()
    eng.generate([prompt(6)], GREEDY)
    stats = eng.kv_connector_stats
    assert isinstance(stats, KVConnectorStats) and stats.data["steps"] == eng.num_steps
    eng.shutdown()
    eng.shutdown()
    assert [h for _, h, _ in fc.LOGS[log]].count("shutdown") == 2  # one per half
    with pytest.raises(RuntimeError, match="shutdown"):
        eng.step()
