"""The leak gauges on a real server's ``/metrics``: above 0 while something is held, 0 after.

P and D are ``kvbridge serve`` apps (HTTP, engine thread, real zmq side channel) running
MultiConnector(NixlConnector, a CPU tier). NIXL is the in-process fabric of linked fakes
(``reliability.fabric``), so D's READ can be held in flight; the CPU tier's loads report done
only while ``support.gated_offload.OPEN`` is set, so a load can be held in flight too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

import httpx
import pytest

from e2e.http_fixtures import (
    ENGINE_KWARGS,
    GaugeScheduler,
    RunningServer,
    metric_value,
    running_server,
)
from kvbridge.config import TransferConfig
from kvbridge.engine.engine import EngineConfig, LLMEngine
from kvbridge.engine.sampling import SamplingParams
from reliability.fabric import FaultyFabric
from support import gated_offload

pytestmark = pytest.mark.e2e

NIXL, CPU = "NixlConnector", "GatedCPUOffloadConnector"  # the children's connector labels
# The README's leak gauges -> the child that reports each.
LEAK_GAUGES = {
    "kvbridge:num_blocks_held_for_remote_decode": NIXL,
    "kvbridge:num_live_leases": NIXL,
    "kvbridge:nixl_num_inflight_xfer_handles": NIXL,
    "kvbridge:nixl_num_inflight_dlist_handles": NIXL,
    "kvbridge:num_pinned_cpu_blocks": CPU,
}
BLOCK_SIZE = 4
PROMPT = list(range(3, 43))  # 40 tokens: 10 blocks
ENGINE = {"block_size": BLOCK_SIZE, "num_gpu_blocks": 24, "max_num_seqs": 4}
Gauges = dict[str, float]  # metric name -> value, for the child that reports it


def _config(role: str, engine_id: str, fabric: FaultyFabric) -> TransferConfig:
    nixl_extra = {"side_channel_port": 0, "nixl_wrapper": fabric.factory}
    nixl = {"kv_connector": "NixlConnector", "kv_connector_extra_config": nixl_extra}
    cpu = {
        "kv_connector": CPU,
        "kv_connector_module_path": "support.gated_offload",
        "kv_connector_extra_config": {"num_cpu_blocks": 64},
    }
    return TransferConfig.from_dict(
        {
            "kv_connector": "MultiConnector",
            "kv_role": role,
            "engine_id": engine_id,
            "kv_connector_extra_config": {"connectors": [nixl, cpu]},
        }
    )


@pytest.fixture(scope="module")
def pd() -> Iterator[tuple[RunningServer, RunningServer, FaultyFabric]]:
    fabric = FaultyFabric()
    with ExitStack() as stack:
        p = stack.enter_context(
            running_server(**ENGINE, kv_transfer_config=_config("kv_producer", "prefill", fabric))
        )
        d = stack.enter_context(
            running_server(**ENGINE, kv_transfer_config=_config("kv_consumer", "decode", fabric))
        )
        yield p, d, fabric


@pytest.fixture(autouse=True)
def gate_open_afterwards() -> Iterator[None]:
    yield
    gated_offload.OPEN.set()


def leak_gauges(server: RunningServer) -> Gauges:
    """Every README leak gauge as ``/metrics`` shows it (a missing one fails here)."""
    text = server.metrics()
    values = {name: metric_value(text, name, connector=c) for name, c in LEAK_GAUGES.items()}
    missing = [name for name, value in values.items() if value is None]
    assert not missing, f"not on /metrics: {missing}"
    return {name: float(v or 0) for name, v in values.items()}


def wait_gauges(
    server: RunningServer, ok: Callable[[Gauges], bool], what: str, timeout_s: float = 20.0
) -> Gauges:
    """Scrape ``/metrics`` until ``ok``; fail naming ``what`` and the last values."""
    deadline = time.monotonic() + timeout_s
    while not ok(gauges := leak_gauges(server)):
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s}s; last {gauges}"
        time.sleep(0.01)
    return gauges


def all_zero(gauges: Gauges) -> bool:
    return not any(gauges.values())


def post(server: RunningServer, body: dict[str, Any]) -> httpx.Response:
    """A completion from another thread than the test's (its own client)."""
    with httpx.Client(base_url=server.url, timeout=60, trust_env=False) as client:
        return client.post("/v1/completions", json=body)


def test_held_blocks_leases_and_a_read_in_flight_show_then_drain_to_zero(pd: Any) -> None:
    p, d, fabric = pd
    wait_gauges(p, all_zero, "P idle")
    r = p.complete(prompt=PROMPT, max_tokens=1, temperature=0,
                   kv_transfer_params={"do_remote_decode": True})  # fmt: skip
    assert r.status_code == 200, r.text
    params = r.json()["kv_transfer_params"]
    held = "kvbridge:num_blocks_held_for_remote_decode"
    g = wait_gauges(p, lambda g: g["kvbridge:num_live_leases"] > 0, "P's lease started")
    assert (g[held], g["kvbridge:num_live_leases"]) == (10, 1)
    reader = fabric.agent_of("decode")
    reader.cycles_before_xfer_done = 10**9  # D's READ stays in flight until let go
    body = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "ignore_eos": True,
            "kv_transfer_params": params}  # fmt: skip
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(post, d, body)
        xfers = "kvbridge:nixl_num_inflight_xfer_handles"
        g = wait_gauges(d, lambda g: g[xfers] > 0, "D's READ in flight")
        assert g[xfers] == 1 and g[held] == 0
        assert leak_gauges(p)[held] == 10  # P holds while D reads
        reader.cycles_before_xfer_done = 0
        r = answer.result(timeout=60)
    assert r.status_code == 200, r.text
    # every prompt token came from P (it handed its first token over)
    assert r.json()["usage"]["prompt_tokens_details"]["external_tokens"] == len(PROMPT)
    assert r.json()["choices"][0]["token_ids"] == _reference(PROMPT, 3)
    wait_gauges(p, all_zero, "P drained")
    wait_gauges(d, all_zero, "D drained")


@pytest.mark.parametrize("role", ["P", "D"])
def test_cpu_tier_pins_show_while_a_load_is_in_flight_then_drain_to_zero(
    pd: Any, role: str
) -> None:
    server = pd[0] if role == "P" else pd[1]
    wait_gauges(server, all_zero, f"{role} idle")
    first, *others = ([k, *PROMPT] for k in (7, 8, 9, 10))  # 41 tokens each, no block shared
    for prompt in (first, *others):  # the others evict `first` from the GPU prefix cache
        assert post(server, _body(prompt)).status_code == 200
    gated_offload.OPEN.clear()  # `first` again: its blocks come from the CPU tier, slowly
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(post, server, _body(first))
        pinned = "kvbridge:num_pinned_cpu_blocks"
        g = wait_gauges(server, lambda g: g[pinned] > 0, f"{role}'s CPU load in flight")
        assert g[pinned] >= 2, g
        copies = "kvbridge:kv_offload_num_inflight_copies"
        assert metric_value(server.metrics(), copies, connector=CPU) == 1  # the worker's view
        gated_offload.OPEN.set()
        r = answer.result(timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["token_ids"] == _reference(first, 2)
    wait_gauges(server, all_zero, f"{role} drained")
    assert metric_value(server.metrics(), copies, connector=CPU) == 0


def _body(prompt: list[int]) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": 2, "temperature": 0, "ignore_eos": True}


def _reference(prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens of a monolithic engine with the servers' weights and paging."""
    with LLMEngine(EngineConfig(**{**ENGINE_KWARGS, **ENGINE})) as engine:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return engine.generate([prompt], params)[0].token_ids


def test_a_gauge_that_moves_while_the_engine_idles_shows_on_the_next_scrape() -> None:
    """No request, so no step: only the scrape itself can read the connector (a producer found
    gone is detached that way while a decode engine idles)."""
    config = TransferConfig(
        kv_connector="GaugeConnector", kv_connector_module_path="e2e.http_fixtures"
    )
    with running_server(kv_transfer_config=config) as s:
        label = {"connector": "GaugeConnector"}
        assert metric_value(s.metrics(), "kvbridge:things_held", **label) == 0
        GaugeScheduler.value = 4
        try:
            assert metric_value(s.metrics(), "kvbridge:things_held", **label) == 4
            assert s.loop.call(lambda e: e.num_steps) == 0
        finally:
            GaugeScheduler.value = 0
