"""``GET /metrics`` exposes the SPEC §7 series, fed by real requests and connector stats."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from e2e.http_fixtures import RunningServer, metric_value, running_server
from kvbridge.config import TransferConfig

pytestmark = pytest.mark.e2e

STATS_CONNECTOR = TransferConfig(
    kv_connector="StatsConnector", kv_connector_module_path="e2e.http_fixtures"
)


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with running_server(kv_transfer_config=STATS_CONNECTOR) as s:
        r = s.complete(prompt=list(range(1, 21)), max_tokens=3, temperature=0, ignore_eos=True)
        assert r.status_code == 200, r.text
        yield s


def test_request_series(server: RunningServer):
    text = server.metrics()
    assert metric_value(text, "kvbridge:request_success_total", finished_reason="length") == 1
    assert metric_value(text, "kvbridge:prompt_tokens_total") == 20
    assert metric_value(text, "kvbridge:generation_tokens_total") == 3
    assert metric_value(text, "kvbridge:time_to_first_token_seconds_count") == 1
    assert metric_value(text, "kvbridge:e2e_request_latency_seconds_count") == 1
    by_source = "kvbridge:prompt_tokens_by_source_total"
    assert metric_value(text, by_source, source="local_compute") == 20
    for source in ("local_cache_hit", "cpu_tier", "remote"):
        assert metric_value(text, by_source, source=source) == 0
    assert metric_value(text, "kvbridge:num_requests_running") == 0
    assert metric_value(text, "kvbridge:num_free_gpu_blocks") == 64


def test_connector_stats_map_to_named_series(server: RunningServer):
    text = server.metrics()
    steps = metric_value(text, "kvbridge:nixl_num_failed_transfers_total",
                         connector="StatsConnector")  # fmt: skip
    assert steps is not None and steps >= 3  # one per engine step (prefill + 2 decodes at least)
    assert metric_value(text, "kvbridge:nixl_xfer_time_seconds_count",
                        connector="StatsConnector") == steps  # fmt: skip
    assert metric_value(text, "kvbridge:nixl_bytes_transferred_sum",
                        connector="StatsConnector") == 4096 * steps  # fmt: skip
    offload = "kvbridge:kv_offload_total_bytes_total"
    assert metric_value(text, offload, transfer_type="gpu_to_cpu") == 1024 * steps
    offload_time = "kvbridge:kv_offload_total_time_total"
    assert metric_value(text, offload_time, transfer_type="gpu_to_cpu") == 0.5 * steps
    other = "kvbridge:connector_events_total"
    assert metric_value(text, other, connector="StatsConnector", key="brand_new_counter") == (
        3 * steps
    )


def test_each_server_has_its_own_registry(server: RunningServer):
    with running_server() as other:
        text = other.metrics()
        assert metric_value(text, "kvbridge:prompt_tokens_total") == 0
        assert metric_value(text, "kvbridge:nixl_num_failed_transfers_total") is None
    assert metric_value(server.metrics(), "kvbridge:prompt_tokens_total") == 20
