"""First-token handover (SPEC §3): P's first token goes to D in ``kv_transfer_params``; D takes
every prompt token from P and computes that token first, never the prompt's last one.

P and D are reference engines in this process, linked by a ``FaultyFabric`` (real bytes, real
side channel); a monolithic engine with the same weights is the reference, judged by
``kvbridge.oracle`` (tokens and per-token logprobs). Each test fails on the code before the
handover: P returned no ``first_token`` and D counted one prompt token fewer as external.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from kvbridge.engine.engine import LLMEngine
from kvbridge.engine.request import RequestOutput
from kvbridge.engine.runner import SeqChunk
from kvbridge.engine.sampling import SamplingParams
from kvbridge.nixl.params import KVTransferParamsError, parse_kv_transfer_params
from kvbridge.oracle import Trace, check
from reliability.fabric import FaultyFabric
from reliability.pd import BS, PD, engine, prompt

MAX_TOKENS = 6
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=3)
SEEDED = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=3, temperature=0.9,
                        seed=1234)  # fmt: skip
LENGTHS = (2 * BS + 1, 3 * BS, BS + 1)  # a partial last block, an exact multiple, one + one


def _prefill_params(params: SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_tokens=1,
        ignore_eos=True,
        logprobs=params.logprobs,
        temperature=params.temperature,
        seed=params.seed,
    )


def _prefill(pd: PD, rid: str, p: list[int], params: SamplingParams) -> dict[str, Any]:
    pd.p.add_request(p, _prefill_params(params), rid, {"do_remote_decode": True})
    deadline = time.monotonic() + 10
    while True:
        for out in pd.p.step():
            if out.finished:
                assert out.kv_transfer_params is not None
                return out.kv_transfer_params
        assert time.monotonic() < deadline


def _decode(pd: PD, rid: str, p: list[int], kv: dict[str, Any], sp: SamplingParams) -> Any:
    pd.d.add_request(p, sp, rid, kv)
    deadline = time.monotonic() + 15
    while True:
        for out in pd.d.step():
            if out.finished:
                return out
        if pd.p.has_unfinished_requests() or pd.p.has_pending_transfers():
            pd.p.step()
        assert time.monotonic() < deadline, "decode stuck"
        time.sleep(0.0005)


def _computed_tokens(e: LLMEngine) -> list[int]:
    """Counts every token the engine's runner computes from now on (one entry per chunk)."""
    seen: list[int] = []
    execute = e.runner.execute

    def counting(chunks: Any, hooks: Any = None) -> Any:
        seen.extend(len(c.token_ids) for c in chunks if isinstance(c, SeqChunk))
        return execute(chunks, hooks)

    e.runner.execute = counting  # type: ignore[method-assign, assignment]
    return seen


def _reference(p: list[int], sp: SamplingParams) -> RequestOutput:
    with engine() as mono:
        return mono.generate([p], sp)[0]


@pytest.mark.parametrize("sp", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_handover_equals_monolithic_and_d_never_computes_the_last_prompt_token(
    sp: SamplingParams,
) -> None:
    pd = PD(FaultyFabric())
    computed = _computed_tokens(pd.d)
    try:
        for n in LENGTHS:
            p = prompt(n, n)
            kv = _prefill(pd, f"p{n}", p, sp)
            token = kv["first_token"]
            assert token["rank"] >= 1 and len(token["top_logprobs"]) == 3
            computed.clear()
            out = _decode(pd, f"d{n}", p, kv, sp)
            want = _reference(p, sp)
            verdict = check(Trace.from_output(want), Trace.from_output(out))
            assert verdict.ok and verdict.compared == MAX_TOKENS, (n, verdict)
            assert out.token_ids[0] == token["token_id"]
            # every prompt token came from P; D computed P's token and the ones after it only
            assert out.num_external_tokens == len(p)
            assert sum(computed) == MAX_TOKENS - 1, computed
    finally:
        pd.p.shutdown()
        pd.d.shutdown()


def test_a_failed_load_with_a_handed_over_token_is_recomputed_right() -> None:
    pd = PD(FaultyFabric())
    try:
        p = prompt(7, 3 * BS + 2)
        kv = _prefill(pd, "p", p, GREEDY)
        assert "first_token" in kv
        pd.fabric.agent_of("decode").fail_next_xfers(1)
        out = _decode(pd, "d", p, kv, GREEDY)
        verdict = check(Trace.from_output(_reference(p, GREEDY)), Trace.from_output(out))
        assert verdict.ok and verdict.compared == MAX_TOKENS, verdict
        assert out.error is None and out.num_external_tokens == 0  # nothing usable arrived
    finally:
        pd.p.shutdown()
        pd.d.shutdown()


def test_without_a_first_token_d_recomputes_the_last_prompt_token() -> None:
    """An older producer (no ``first_token``): the plain path, still right."""
    pd = PD(FaultyFabric())
    computed = _computed_tokens(pd.d)
    try:
        p = prompt(8, 2 * BS + 3)
        kv = _prefill(pd, "p", p, GREEDY)
        assert "first_token" in kv  # this P hands it over; an older one did not
        old = {k: v for k, v in kv.items() if k != "first_token"}
        computed.clear()
        out = _decode(pd, "d", p, old, GREEDY)
        verdict = check(Trace.from_output(_reference(p, GREEDY)), Trace.from_output(out))
        assert verdict.ok and verdict.compared == MAX_TOKENS, verdict
        assert out.num_external_tokens == len(p) - 1
        assert sum(computed) == MAX_TOKENS  # the last prompt token, then 5 decode steps
    finally:
        pd.p.shutdown()
        pd.d.shutdown()


def test_a_token_that_ends_the_request_is_not_taken_and_p_is_released() -> None:
    pd = PD(FaultyFabric())
    try:
        p = prompt(9, 2 * BS + 1)
        kv = _prefill(pd, "p", p, GREEDY)
        one = SamplingParams(max_tokens=1, ignore_eos=True, logprobs=3)
        out = _decode(pd, "d", p, kv, one)
        assert out.token_ids == [kv["first_token"]["token_id"]]
        assert out.num_external_tokens == len(p) - 1  # the plain path: D sampled it itself
        pd.wait_producer_free(timeout_s=0.5)  # D read and released; no lease lapse
    finally:
        pd.p.shutdown()
        pd.d.shutdown()


REMOTE = {"do_remote_prefill": True, "remote_engine_id": "p", "remote_host": "127.0.0.1",
          "remote_port": 5600, "remote_block_ids": [1, 2]}  # fmt: skip


@pytest.mark.parametrize(
    ("first_token", "message"),
    [
        ({"token_id": -1}, "first_token.token_id: must be >= 0"),
        ({"token_id": "7"}, "first_token.token_id: Expected `int`"),
        ({"token_id": 7, "logprob": 0.5}, "first_token.logprob: must be a finite number <= 0"),
        ({"token_id": 7, "rank": 0}, "first_token.rank: must be >= 1"),
        ({"token_id": 7, "top_logprobs": [[7]]}, "first_token.top_logprobs[0]"),
        ({"token_id": 7, "top_logprob": []}, "first_token.top_logprob: unknown field"),
        ({}, "first_token: Object missing required field `token_id`"),
    ],
)
def test_bad_first_token_is_refused_naming_the_field(first_token: Any, message: str) -> None:
    with pytest.raises(KVTransferParamsError, match="kv_transfer_params." + re.escape(message)):
        parse_kv_transfer_params({**REMOTE, "first_token": first_token})


def test_first_token_outside_the_vocab_is_refused_by_the_engine() -> None:
    pd = PD(FaultyFabric())
    try:
        p = prompt(10, 2 * BS)
        kv = _prefill(pd, "p", p, GREEDY)
        bad = {**kv, "first_token": {**kv["first_token"], "token_id": pd.d.model_config.vocab_size}}
        with pytest.raises(ValueError, match="first_token.token_id: .* outside the vocab"):
            pd.d.add_request(p, GREEDY, "d", bad)
        assert "d" not in pd.d.scheduler.requests
        with pytest.raises(KVTransferParamsError, match="only with do_remote_prefill"):
            parse_kv_transfer_params({"do_remote_decode": True, "first_token": {"token_id": 1}})
    finally:
        pd.p.shutdown()
        pd.d.shutdown()
