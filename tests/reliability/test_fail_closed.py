"""Fail closed where peers shipped bugs: no request is answered with KV that is not its own,
and a load that failed under ``kv_load_failure_policy: fail`` is an error, never a 200.

Engines in one process over a ``FaultyFabric`` (READs copy real bytes; the side channel is real
zmq), and real HTTP servers for the status codes. Each test names the broken build it was
checked against: with that change the test fails.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from typing import Any

import httpx
import pytest
import torch

from e2e.http_fixtures import BackgroundServer, reference_tokens, running_server
from kvbridge.config import TransferConfig
from kvbridge.engine.engine import LLMEngine
from kvbridge.nixl import stats as keys
from kvbridge.nixl.worker import NixlWorker
from kvbridge.serve.proxy import build_proxy_app
from reliability.fabric import FaultyFabric
from reliability.invariants import ResourceLedger, parts, wait_until
from reliability.pd import GREEDY, PD, expected, prompt


def counter(e: LLMEngine, key: str) -> int:
    stats = e.kv_connector_stats
    value = 0 if stats is None else stats.data.get(key, 0)
    assert isinstance(value, int)
    return value


def decode_until_done(pd: PD, rid: str, p: list[int], params: dict[str, Any] | None) -> Any:
    """Decode on D (adding the request unless ``params`` is None: added already), stepping P
    too, until ``rid`` ends."""
    if params is not None:
        pd.d.add_request(p, GREEDY, rid, params)
    deadline = time.monotonic() + 15
    while True:
        assert time.monotonic() < deadline, f"{rid} never finished"
        for out in pd.d.step():
            if out.finished and out.request_id == rid:
                return out
        if pd.p.has_unfinished_requests() or pd.p.has_pending_transfers():
            pd.p.step()
        time.sleep(0.0005)


def test_another_prompts_kv_transfer_params_never_serve_its_kv(ledger: ResourceLedger) -> None:
    """A request for prompt B carrying prompt A's params (same length, P still holds A): P's
    answer names A's prompt, B's load fails ("hold another prompt"), B is recomputed; A's
    lease is not B's to end, so A's own request still reads it. Checked against a broken build
    (lease answers' prompt hash ignored): B's load lands with A's KV (other tokens than B's)
    and this test fails."""
    fabric = FaultyFabric()
    pd = PD(fabric, kv_lease_duration_s=5.0, abort_timeout_s=20.0)
    ledger.track(pd.p)
    ledger.track(pd.d)
    a, b = prompt(30, n=18), prompt(31, n=18)
    assert a != b
    params_a = pd.prefill("p-a", a)
    transport = fabric.agent_of("decode")
    transport.cycles_before_xfer_done = 10**9  # B's READ stays in flight until P answers
    (worker,) = parts(pd.d, NixlWorker)
    confirmer = worker.registered.reader.confirmer  # type: ignore[union-attr]
    pd.d.add_request(b, GREEDY, "d-b", params_a)
    finished: list[Any] = []

    def step_both() -> None:
        finished.extend(o for o in pd.d.step() if o.finished)
        pd.p.step()

    wait_until(
        lambda: (transport.num_live_xfer_handles == 1 and confirmer.num_open == 0) or finished,
        timeout_s=10,
        what="P's answer to B's lease question",
        poll=step_both,
    )
    transport.cycles_before_xfer_done = 1  # the READ may end now
    out_b = finished[0] if finished else decode_until_done(pd, "d-b", b, None)
    assert out_b.token_ids == expected(b) and out_b.error is None  # recomputed
    assert counter(pd.d, keys.FAILED_CONFIRMS) == 1 and counter(pd.d, keys.NUM_TRANSFERS) == 0
    assert pd.p.has_pending_transfers()  # A is still held: B neither released nor read it
    out_a = decode_until_done(pd, "d-a", a, params_a)
    assert out_a.token_ids == expected(a)
    assert counter(pd.d, keys.NUM_TRANSFERS) == 1 and counter(pd.d, keys.FAILED_CONFIRMS) == 1
    pd.wait_producer_free(timeout_s=5)
    ledger.assert_all_idle()


def test_spent_kv_transfer_params_never_serve_the_reused_blocks(ledger: ResourceLedger) -> None:
    """The same prompt sent again with the params a finished request already read: P freed
    those blocks and reused them (here: overwritten). The second READ is refused ("read by
    another load already") and the prompt recomputed. Checked against a broken build (the
    "done" answer's reader ignored): the garbage lands and this test fails."""
    fabric = FaultyFabric()
    pd = PD(fabric)
    ledger.track(pd.p)
    ledger.track(pd.d)
    a = prompt(32, n=18)
    params = pd.prefill("p-a", a)
    first = decode_until_done(pd, "d-a1", a, params)
    assert first.token_ids == expected(a) and counter(pd.d, keys.NUM_TRANSFERS) == 1
    pd.wait_producer_free(timeout_s=5)  # the lease is done: P may reuse the blocks
    for cache in pd.p.runner.kv_caches.values():
        cache.copy_(torch.randn_like(cache) * 100)
    again = decode_until_done(pd, "d-a2", a, params)
    assert again.token_ids == expected(a) and again.error is None  # recomputed
    assert counter(pd.d, keys.FAILED_CONFIRMS) == 1
    ledger.assert_all_idle()


# -- kv_load_failure_policy: fail over HTTP ------------------------------------------------------
PROMPT = list(range(3, 23))  # 20 tokens: five blocks of 4
BODY: dict[str, Any] = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "ignore_eos": True}


def nixl(role: str, fabric: FaultyFabric, policy: str = "recompute") -> TransferConfig:
    return TransferConfig(
        kv_connector="NixlConnector",
        kv_role=role,  # type: ignore[arg-type]
        engine_id="prefill" if role == "kv_producer" else "decode",
        kv_load_failure_policy=policy,  # type: ignore[arg-type]
        kv_connector_extra_config={"side_channel_port": 0, "nixl_wrapper": fabric.factory},
    )


@pytest.fixture(scope="module")
def monolithic() -> list[int]:
    return reference_tokens([PROMPT], max_tokens=4, ignore_eos=True)[0]


@pytest.mark.parametrize("stream", [False, True])
def test_a_failed_load_under_policy_fail_is_an_error_status_never_200(
    stream: bool, monolithic: list[int]
) -> None:
    """D's READ ends in ERR under ``kv_load_failure_policy: fail``: the client gets a 5xx that
    names the policy, streamed or not, directly and through the proxy, and no token; the
    control (``recompute``) gets 200 with the monolithic tokens. Checked against a broken build
    (the server answering an "error" finish like a normal one): this test fails.

    One exception, by design of the first-token handover: a stream through the proxy starts
    (200) with P's first token before D is asked, so D's failure arrives as an error event that
    names the policy, after that one token and before ``[DONE]``; D sends no token. (A first
    token that is only part of a UTF-8 character is left to D's stream: then the 5xx again.)"""
    for policy in ("fail", "recompute"):
        fabric = FaultyFabric()
        p_cfg, d_cfg = nixl("kv_producer", fabric), nixl("kv_consumer", fabric, policy)
        with ExitStack() as stack:
            p = stack.enter_context(running_server(kv_transfer_config=p_cfg, block_size=4))
            d = stack.enter_context(running_server(kv_transfer_config=d_cfg, block_size=4))
            proxy = stack.enter_context(
                BackgroundServer(build_proxy_app([p.url], [d.url], timeout_s=60))
            )
            client = stack.enter_context(
                httpx.Client(base_url=proxy.url, timeout=60, trust_env=False)
            )
            for via in (client, None):
                fabric.agent_of("decode").fail_next_xfers(1)
                status, text = _complete(via, p, d, stream)
                if policy == "fail" and stream and via is not None and status == 200:
                    events = [e for e in text.split("\n\n") if e.startswith("data: ")]
                    assert len(events) == 3 and events[-1] == "data: [DONE]", text
                    assert json.loads(events[0][6:])["choices"][0]["token_ids"] == monolithic[:1]
                    assert (
                        "kv_load_failure_policy=fail" in events[1] and "token_ids" not in events[1]
                    )
                elif policy == "fail":
                    assert status >= 500, text
                    assert "kv_load_failure_policy=fail" in text and "token_ids" not in text
                else:
                    assert status == 200, text
                    assert _tokens(text, stream) == monolithic


def _complete(proxy: httpx.Client | None, p: Any, d: Any, stream: bool) -> tuple[int, str]:
    """Through the proxy, or P then D by hand (as the proxy does)."""
    body = {**BODY, "stream": stream}
    if proxy is None:
        pre = p.complete(
            **{**BODY, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}
        )
        assert pre.status_code == 200, pre.text
        body["kv_transfer_params"] = pre.json()["kv_transfer_params"]
        client = d.client
    else:
        client = proxy
    r = client.post("/v1/completions", json=body)
    return r.status_code, r.text


def _tokens(text: str, stream: bool) -> list[int]:
    if not stream:
        return list(json.loads(text)["choices"][0]["token_ids"])
    events = [
        line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")
    ]
    return [t for e in events if e != "[DONE]" for t in json.loads(e)["choices"][0]["token_ids"]]
