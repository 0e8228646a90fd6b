"""The engine calls every connector hook, scheduler and worker half, in SPEC §1's order."""

from __future__ import annotations

from typing import Any

import engine_fake_connector as fc
from engine_helpers import GREEDY, engine, generate, prompt, reference_kv, run, scripted

from kvbridge.config import TransferConfig
from kvbridge.engine.sampling import SamplingParams

LAYERS = ["layers.0", "layers.1"]


def _worker_step(loads: list[str], finished: list[str], forward: bool) -> list[tuple[str, Any]]:
    per_layer = [(h, name) for name in LAYERS for h in ("wait_for_layer_load", "save_kv_layer")]
    return [
        ("bind_connector_metadata", None),
        ("start_load_kv", loads),
        *(per_layer if forward else []),
        ("wait_for_save", None),
        ("get_finished", finished),
        ("get_block_ids_with_load_errors", None),
        ("build_connector_worker_meta", None),
        ("get_kv_connector_stats", None),
        ("clear_connector_metadata", None),
    ]


def _step_tail(output: tuple[list[str], list[str], list[int]]) -> list[tuple[str, Any]]:
    return [
        ("update_connector_output", output),
        ("get_kv_connector_stats", None),
        ("take_events", None),
    ]


def test_recorded_hook_sequence_async_load_decode_and_delayed_free() -> None:
    p = prompt(10)
    fc.STORES["order"] = {tuple(p): reference_kv(p)}
    cfg = scripted(store="order", load_async=True, delay_free=True, probe="order")
    eng = engine(kv_transfer_config=cfg, block_size=4)
    fc.PROBES["order"] = eng.block_manager.has_blocks
    rid = eng.add_request(p, SamplingParams(max_tokens=2, ignore_eos=True), request_id="r")
    final = run(eng)
    eng.shutdown()
    eng.shutdown()  # idempotent: no second connector shutdown below
    log = [(hook, detail) for _, hook, detail in fc.LOGS[cfg.extra("log")]]

    expected: list[tuple[str, Any]] = [
        ("register_kv_caches", LAYERS),
        ("get_handshake_metadata", None),
        # step 0: lookup, allocate, park; the worker starts the load, which finishes at once
        ("get_num_new_matched_tokens", (rid, 0)),
        ("update_state_after_alloc", (rid, 9)),
        ("build_connector_meta", ([], [], [])),
        *_worker_step([rid], [], forward=False),
        *_step_tail(([], [rid], [])),
        # step 1: loaded -> second update_state_after_alloc (0 tokens), then the last token
        ("update_state_after_alloc", (rid, 0)),
        ("build_connector_meta", ([(rid, 9, 1)], [], [])),
        *_worker_step([], [], forward=True),
        *_step_tail(([], [], [])),
        # step 2: decode, max_tokens reached: request_finished while its blocks are still held
        ("build_connector_meta", ([(rid, 10, 1)], [], [])),
        *_worker_step([], [], forward=True),
        ("update_connector_output", ([], [], [])),
        ("request_finished", (rid, [0, 1, 2], True)),
        ("get_kv_connector_stats", None),
        ("take_events", None),
        # step 3: the worker learns the id finished; its send completes; blocks freed
        ("build_connector_meta", ([], [rid], [])),
        *_worker_step([], [rid], forward=False),
        *_step_tail(([rid], [], [])),
        ("shutdown", None),
        ("shutdown", None),
    ]
    assert log == expected
    halves = [half for half, _, _ in fc.LOGS[cfg.extra("log")]]
    assert halves[-2:] == ["W", "S"]
    assert final[rid].num_external_tokens == 9
    assert final[rid].token_ids == generate(engine(), [p], SamplingParams(2, ignore_eos=True))[0]
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_hook_order_invariants_with_preemption_retries_and_sync_loads() -> None:
    prompts = [prompt(14, seed=s) for s in range(5)]
    fc.STORES["inv"] = {tuple(p): reference_kv(p) for p in prompts[:2]}
    cfg = scripted(store="inv", none_first=1, probe="inv")
    eng = engine(kv_transfer_config=cfg, num_gpu_blocks=12, max_model_len=40)
    fc.PROBES["inv"] = eng.block_manager.has_blocks
    ids = [eng.add_request(p, GREEDY) for p in prompts]
    run(eng)
    assert eng.scheduler.num_preemptions > 0
    log = fc.LOGS[cfg.extra("log")]
    events = [(half, hook) for half, hook, _ in log]

    # Steps strictly alternate: meta -> worker hooks (bind ... clear) -> update_connector_output.
    metas = [i for i, e in enumerate(events) if e == ("S", "build_connector_meta")]
    binds = [i for i, e in enumerate(events) if e == ("W", "bind_connector_metadata")]
    clears = [i for i, e in enumerate(events) if e == ("W", "clear_connector_metadata")]
    outputs = [i for i, e in enumerate(events) if e == ("S", "update_connector_output")]
    assert len(metas) == len(binds) == len(clears) == len(outputs) == eng.num_steps
    for m, b, c, o, m_next in zip(metas, binds, clears, outputs, [*metas[1:], len(events)]):
        assert m < b < c < o < m_next

    for rid in ids:
        mine = [(hook, d) for _, hook, d in log if isinstance(d, tuple) and d and d[0] == rid]
        hooks = [h for h, _ in mine]
        assert hooks[0] == "get_num_new_matched_tokens"
        # The first lookup answered None: asked again, never allocated in between.
        assert hooks[1] == "get_num_new_matched_tokens"
        finished = [d for h, d in mine if h == "request_finished"]
        assert len(finished) == 1 and finished[0][2] is True  # blocks still held at the call
        assert hooks[-1] == "request_finished"
        for i, h in enumerate(hooks):
            if h == "update_state_after_alloc":
                assert hooks[i - 1] == "get_num_new_matched_tokens"
    # Sync loads: the ScheduledRequest counts only confirmed tokens (not this step's load).
    first_sched = {}
    for _, hook, d in log:
        if hook == "build_connector_meta":
            for rid, computed, _n in d[0]:
                first_sched.setdefault(rid, computed)
    assert first_sched[ids[0]] == 0 and first_sched[ids[1]] == 0
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_noop_connector_runs_every_step_and_matches_plain_engine() -> None:
    prompts = [prompt(9, seed=s) for s in range(3)]
    noop = TransferConfig(kv_connector="NoOpConnector")
    with engine(kv_transfer_config=noop) as eng:
        got = generate(eng, prompts)
        assert eng.num_steps > 0
    assert got == generate(engine(), prompts)
