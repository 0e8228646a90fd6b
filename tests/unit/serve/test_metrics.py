"""ServerMetrics: request series, prompt tokens by source, connector stats per child."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from kvbridge.connector.stats import KVConnectorStats, MultiKVConnectorStats
from kvbridge.serve.metrics import ServerMetrics


def _value(m: ServerMetrics, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(m.render().decode()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


def test_prompt_tokens_by_source():
    m = ServerMetrics("tiny")
    m.observe_finished(finish_reason="length", num_prompt_tokens=40, num_generated=3,
                       num_cached=16, num_external=23, remote=True, e2e_seconds=0.1)  # fmt: skip
    m.observe_finished(finish_reason="stop", num_prompt_tokens=20, num_generated=1,
                       num_cached=0, num_external=16, remote=False, e2e_seconds=None)  # fmt: skip
    src = "kvbridge:prompt_tokens_by_source_total"
    assert _value(m, src, source="local_compute") == 1 + 4
    assert _value(m, src, source="local_cache_hit") == 16
    assert _value(m, src, source="remote") == 23
    assert _value(m, src, source="cpu_tier") == 16
    assert _value(m, "kvbridge:prompt_tokens_total") == 60
    assert _value(m, "kvbridge:request_success_total", finished_reason="stop") == 1
    assert _value(m, "kvbridge:e2e_request_latency_seconds_count") == 1


def test_multi_stats_are_labelled_per_child():
    nixl = KVConnectorStats()
    nixl.observe("xfer_time_seconds", 0.25)
    nixl.observe("bytes_transferred", 1 << 20)
    nixl.incr("num_kv_expired_reqs", 2)
    nixl.incr("num_notifications_sent", 5)
    offload = KVConnectorStats()
    offload.incr("cpu_to_gpu_bytes", 4096)
    offload.observe("cpu_to_gpu_time_s", 0.125)
    offload.observe("cpu_to_gpu_time_s", 0.125)
    offload.incr("cpu_hit_tokens", 32)
    stats = MultiKVConnectorStats()
    stats.add("NixlConnector", nixl)
    stats.add("SimpleCPUOffloadConnector", offload)
    m = ServerMetrics("tiny")
    m.record_connector_stats(stats, name="MultiConnector")
    m.record_connector_stats(stats, name="MultiConnector")  # deltas add up
    n = {"connector": "NixlConnector"}
    assert _value(m, "kvbridge:nixl_xfer_time_seconds_sum", **n) == 0.5
    assert _value(m, "kvbridge:nixl_bytes_transferred_count", **n) == 2
    assert _value(m, "kvbridge:nixl_num_kv_expired_reqs_total", **n) == 4
    assert _value(m, "kvbridge:connector_events_total", key="num_notifications_sent", **n) == 10
    kind = {"transfer_type": "cpu_to_gpu"}
    assert _value(m, "kvbridge:kv_offload_total_bytes_total", **kind) == 8192
    assert _value(m, "kvbridge:kv_offload_total_time_total", **kind) == 0.5
    hits = "kvbridge:kv_offload_hit_tokens_total"
    assert _value(m, hits, connector="SimpleCPUOffloadConnector") == 64


def test_single_connector_uses_its_name_and_engine_gauges():
    m = ServerMetrics("tiny")
    stats = KVConnectorStats()
    stats.incr("num_failed_transfers", 1)
    m.record_connector_stats(stats, name="NixlConnector")
    m.set_gauges({"num_requests_running": 2, "some_engine_value": 7, "flag": True})
    assert _value(m, "kvbridge:nixl_num_failed_transfers_total", connector="NixlConnector") == 1
    assert _value(m, "kvbridge:num_requests_running") == 2
    assert _value(m, "kvbridge:engine_gauge", key="some_engine_value") == 7
    assert _value(m, "kvbridge:engine_gauge", key="flag") is None


def test_connector_gauges_are_snapshots_labelled_by_connector():
    m = ServerMetrics("tiny")
    assert _value(m, "kvbridge:num_pinned_cpu_blocks") is None  # none until a connector says
    m.set_connector_gauges({"NixlConnector": {"num_live_leases": 3, "brand_new": 1},
                            "SimpleCPUOffloadConnector": {"num_pinned_cpu_blocks": 5}})  # fmt: skip
    m.set_connector_gauges({"NixlConnector": {"num_live_leases": 1, "brand_new": 0},
                            "SimpleCPUOffloadConnector": {"num_pinned_cpu_blocks": 0}})  # fmt: skip
    assert _value(m, "kvbridge:num_live_leases", connector="NixlConnector") == 1  # set, not added
    assert _value(m, "kvbridge:num_pinned_cpu_blocks",
                  connector="SimpleCPUOffloadConnector") == 0  # fmt: skip
    assert _value(m, "kvbridge:brand_new", connector="NixlConnector") == 0
    # a key whose series name is taken still shows, under the catch-all with a key label
    m.set_connector_gauges({"NixlConnector": {"prompt_tokens": 4}})
    other = _value(m, "kvbridge:connector_gauge", connector="NixlConnector", key="prompt_tokens")
    assert other == 4
