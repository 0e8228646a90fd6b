"""A load that completes within its step computes in that step (issue 19): ``LLMEngine.step``
does not leave a request whose async load finished to the next step just to notice it."""

from __future__ import annotations

import engine_fake_connector as fc
from engine_helpers import GREEDY, engine, prompt, reference_kv, scripted

from kvbridge.engine.request import RequestStatus


def _first_token_step(load_steps: int) -> tuple[int, int, list[int]]:
    """(steps until the first token, the engine's passes by then, the tokens)."""
    p = prompt(14, seed=5)
    fc.STORES["same-step"] = {tuple(p): reference_kv(p)}
    eng = engine(kv_transfer_config=scripted(store="same-step", load_async=True,
                                             load_steps=load_steps))  # fmt: skip
    rid = eng.add_request(p, GREEDY)
    steps = 0
    tokens: list[int] = []
    while not tokens:
        steps += 1
        outs = {o.request_id: o for o in eng.step()}
        if rid in outs:
            tokens = outs[rid].token_ids
    assert eng.scheduler.requests[rid].status is RequestStatus.RUNNING
    assert eng.scheduler.requests[rid].num_external_tokens == len(p) - 1
    eng.shutdown()
    return steps, eng.num_passes, tokens


def test_a_load_done_in_its_step_computes_in_that_step() -> None:
    steps, passes, tokens = _first_token_step(load_steps=1)
    with engine() as plain:
        assert tokens == plain.generate([prompt(14, seed=5)], GREEDY)[0].token_ids[:1]
    # step 1: admitted, load started and reported done, then computed at once (was 2 steps)
    assert steps == 1 and passes == 2 and len(tokens) == 1


def test_a_load_done_a_step_later_computes_in_that_step() -> None:
    steps, passes, _ = _first_token_step(load_steps=2)
    assert steps == 2 and passes == 3  # was 3 steps: the one that saw it done computed nothing
