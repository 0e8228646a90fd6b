"""Connector loads through the engine: parking, load errors (recompute or fail), delayed free.

The scripted connector copies K/V from a reference prefill into the engine's blocks, so a
correct engine reproduces the reference tokens exactly.
"""

from __future__ import annotations

import engine_fake_connector as fc
import pytest
from engine_helpers import GREEDY, engine, generate, prompt, reference_kv, run, scripted

from kvbridge.engine.request import RequestStatus
from kvbridge.engine.sampling import SamplingParams

P = prompt(14, seed=7)
OTHER = prompt(9, seed=8)


@pytest.fixture(scope="module")
def reference() -> list[int]:
    fc.STORES["p"] = {tuple(P): reference_kv(P)}
    return generate(engine(), [P])[0]


def _scheduled(cfg, rid: str) -> list[tuple[int, int]]:  # type: ignore[no-untyped-def]
    """(confirmed computed, scheduled) of ``rid`` in each step's ScheduledRequest."""
    return [
        (computed, n)
        for _, hook, d in fc.LOGS[cfg.extra("log")]
        if hook == "build_connector_meta"
        for r, computed, n in d[0]
        if r == rid
    ]


def _finished_calls(cfg, rid: str) -> list:  # type: ignore[no-untyped-def]
    log = fc.LOGS[cfg.extra("log")]
    return [d for _, hook, d in log if hook == "request_finished" and d[0] == rid]


def test_async_load_parks_request_until_finished_recving(reference: list[int]) -> None:
    cfg = scripted(store="p", load_async=True, load_steps=4)
    eng = engine(kv_transfer_config=cfg)
    rid = eng.add_request(P, GREEDY)
    other = eng.add_request(OTHER, GREEDY)
    other_tokens = 0
    for _ in range(3):
        outs = {o.request_id: o for o in eng.step()}
        eng.check_integrity()
        request = eng.scheduler.requests[rid]
        assert request.status is RequestStatus.WAITING_FOR_REMOTE_KVS
        assert eng.block_manager.has_blocks(rid) and rid not in outs
        other_tokens = len(outs[other].token_ids)  # the other request is not held up
    assert other_tokens == 3
    final = run(eng)
    assert final[rid].token_ids == reference
    assert final[rid].num_external_tokens == len(P) - 1
    # First scheduled after the load: every loaded token counts as computed, one to compute.
    assert _scheduled(cfg, rid)[0] == (len(P) - 1, 1)
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_loading_garbage_without_reporting_it_changes_the_tokens(reference: list[int]) -> None:
    """Sanity check of the tests below: the loaded K/V really decides the output."""
    eng = engine(kv_transfer_config=scripted(store="p", load_async=True, silent_garbage=True))
    assert generate(eng, [P])[0] != reference


@pytest.mark.parametrize("load_async", [True, False], ids=["async", "sync"])
def test_load_errors_recompute_from_first_bad_block(reference: list[int], load_async: bool) -> None:
    cfg = scripted(store="p", load_async=load_async, load_steps=2, fail_blocks=[2, 1])
    eng = engine(kv_transfer_config=cfg, block_size=4)
    rid = eng.add_request(P, GREEDY)
    final = run(eng)
    assert final[rid].token_ids == reference
    sched = _scheduled(cfg, rid)
    assert final[rid].num_external_tokens == 4  # block 0 loaded; the rest was recomputed
    if load_async:
        assert sched[0] == (4, 10)  # blocks 1 and 2 failed: recompute from token 4
    else:
        # Same-step load: confirmed 0, one token scheduled; the error rolls back to token 4.
        assert sched[:2] == [(0, 1), (4, 10)]
    assert len(_finished_calls(cfg, rid)) == 1


def test_load_error_after_local_prefix_hit_keeps_the_hit(reference: list[int]) -> None:
    cfg = scripted(store="p", load_async=True, fail_blocks=[2])
    eng = engine(kv_transfer_config=cfg, block_size=4)
    warm = eng.add_request(P[:9], GREEDY)  # caches blocks 0-1 (8 tokens) locally
    assert run(eng)[warm].num_cached_tokens == 0
    rid = eng.add_request(P, GREEDY)
    final = run(eng)
    assert final[rid].num_cached_tokens == 8
    assert final[rid].num_external_tokens == 0  # the 5 tokens asked for were recomputed
    assert _scheduled(cfg, rid)[0] == (8, 6)  # block 2 failed: recompute from token 8
    assert final[rid].token_ids == reference


@pytest.mark.parametrize("load_async", [True, False], ids=["async", "sync"])
def test_failure_policy_fail_ends_request_with_error(load_async: bool) -> None:
    fc.STORES["p"] = {tuple(P): reference_kv(P)}
    cfg = scripted(store="p", load_async=load_async, fail_blocks=[0], policy="fail")
    eng = engine(kv_transfer_config=cfg)
    rid = eng.add_request(P, GREEDY)
    final = run(eng)
    assert final[rid].finish_reason == "error"
    assert final[rid].error is not None and "kv_load_failure_policy" in final[rid].error
    assert final[rid].token_ids == []
    assert len(_finished_calls(cfg, rid)) == 1
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_delay_free_holds_blocks_until_finished_sending() -> None:
    params = {"do_remote_prefill": True, "remote_block_ids": [1, 2]}
    cfg = scripted(delay_free=True, send_steps=3, params=params)
    eng = engine(kv_transfer_config=cfg)
    rid = eng.add_request(P, SamplingParams(max_tokens=1))
    outs = eng.step()
    assert outs[0].finished and outs[0].kv_transfer_params == params
    held = eng.block_manager.block_ids(rid)
    assert held and eng.has_pending_transfers() and not eng.has_unfinished_requests()
    for _ in range(2):  # the worker learns of the finish in the next step, then 3 polls
        eng.step()
        eng.check_integrity()
        assert eng.block_manager.block_ids(rid) == held
    eng.drain(timeout_s=10)
    assert not eng.block_manager.has_blocks(rid) and not eng.has_pending_transfers()
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    assert len(_finished_calls(cfg, rid)) == 1


def test_abort_while_loading_keeps_blocks_until_the_load_reports() -> None:
    fc.STORES["p"] = {tuple(P): reference_kv(P)}
    cfg = scripted(store="p", load_async=True, load_steps=4)
    eng = engine(kv_transfer_config=cfg)
    rid = eng.add_request(P, GREEDY)
    eng.step()
    blocks = eng.block_manager.block_ids(rid)
    assert blocks
    assert eng.abort_request(rid)
    assert not eng.abort_request(rid)  # second abort is a no-op
    outs = eng.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [(rid, "abort")]
    # The in-flight load may still write into these blocks: they stay allocated.
    assert eng.block_manager.block_ids(rid) == blocks
    eng.drain(timeout_s=10)
    eng.check_integrity()
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    assert len(_finished_calls(cfg, rid)) == 1


def test_ask_again_skips_the_request_but_not_the_others() -> None:
    cfg = scripted(none_first=3, none_ids=["slow"])
    eng = engine(kv_transfer_config=cfg)
    slow = eng.add_request(P, GREEDY, request_id="slow")
    other = eng.add_request(OTHER, GREEDY)
    for step in range(3):
        outs = {o.request_id: o for o in eng.step()}
        assert slow not in outs and len(outs[other].token_ids) == step + 1
        assert eng.scheduler.requests[slow].status is RequestStatus.WAITING
        assert not eng.block_manager.has_blocks(slow)
    final = run(eng)
    assert final[slow].token_ids == generate(engine(), [P])[0]
    assert final[other].token_ids == generate(engine(), [OTHER])[0]
    log = fc.LOGS[cfg.extra("log")]
    hooks = [h for _, h, d in log if isinstance(d, tuple) and d[0] == slow]
    assert hooks[:5] == ["get_num_new_matched_tokens"] * 4 + ["update_state_after_alloc"]
