"""ServerMetrics: Prometheus series of one server (SPEC §7), in a registry of its own.

Connector stats arrive as deltas (``KVConnectorStats`` counters and samples, or one per child in
``MultiKVConnectorStats``). Known keys map to vLLM-style names with a ``kvbridge:`` prefix and a
``connector`` label; every other key is still exported, as
``kvbridge:connector_events_total{connector,key}`` (counters) or
``kvbridge:connector_samples{connector,key}`` (samples, count and sum), so nothing is dropped.
Connector gauges arrive as snapshots, labelled by connector (``set_connector_gauges``), and are
exported under their own key, ``kvbridge:<key>{connector}``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Summary,
    generate_latest,
)

from kvbridge.connector.gauges import GAUGE_HELP
from kvbridge.connector.stats import KVConnectorStats, MultiKVConnectorStats

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
TIME_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BYTES_BUCKETS = tuple(float(2**k) for k in range(10, 34, 2))  # 1 KiB .. 8 GiB
COUNT_BUCKETS = (1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0)
SOURCES = ("local_compute", "local_cache_hit", "cpu_tier", "remote")

# Keys the connectors report (kvbridge.nixl.stats, kvbridge.offload) -> metric.
# samples key -> (metric name, help, buckets): one observation per transfer.
SAMPLE_METRICS: dict[str, tuple[str, str, tuple[float, ...]]] = {
    "xfer_time_seconds": ("kvbridge:nixl_xfer_time_seconds", "NIXL transfer time", TIME_BUCKETS),
    "post_time_seconds": (
        "kvbridge:nixl_post_time_seconds",
        "NIXL transfer post time",
        TIME_BUCKETS,
    ),
    "bytes_transferred": ("kvbridge:nixl_bytes_transferred", "bytes per transfer", BYTES_BUCKETS),
    "num_descriptors": ("kvbridge:nixl_num_descriptors", "descriptors per transfer", COUNT_BUCKETS),
}
# counter key -> (metric name, help).
COUNTER_METRICS: dict[str, tuple[str, str]] = {
    "num_transfers": ("kvbridge:nixl_num_transfers", "completed NIXL transfers"),
    "num_failed_transfers": ("kvbridge:nixl_num_failed_transfers", "failed NIXL transfers"),
    "num_failed_handshakes": ("kvbridge:nixl_num_failed_handshakes", "failed NIXL handshakes"),
    "num_failed_notifications": (
        "kvbridge:nixl_num_failed_notifications",
        "failed NIXL notifications",
    ),
    "num_kv_expired_reqs": (
        "kvbridge:nixl_num_kv_expired_reqs",
        "requests whose blocks were freed when the lease lapsed",
    ),
    "cpu_hit_tokens": ("kvbridge:kv_offload_hit_tokens", "prompt tokens loaded from the CPU tier"),
    "store_drops": ("kvbridge:kv_offload_store_drops", "stores dropped: CPU pool full"),
    "evictions": ("kvbridge:kv_offload_evictions", "CPU blocks evicted (LRU)"),
    "disk_hits": ("kvbridge:kv_offload_disk_hits", "blocks read back from the disk tier"),
    "disk_misses": (
        "kvbridge:kv_offload_disk_misses",
        "lookups that missed the CPU tier and found nothing more on disk",
    ),
    "disk_evictions": ("kvbridge:kv_offload_disk_evictions", "disk records evicted (LRU)"),
    "disk_corrupt_records": (
        "kvbridge:kv_offload_disk_corrupt_records",
        "disk records found torn or corrupt (served as misses, dropped)",
    ),
    "disk_missing_records": (
        "kvbridge:kv_offload_disk_missing_records",
        "indexed disk records gone when read (served as misses)",
    ),
    "disk_guard_skips": (
        "kvbridge:kv_offload_disk_guard_skips",
        "disk hits not read back: recomputing them was predicted faster",
    ),
    "disk_write_drops": ("kvbridge:kv_offload_disk_write_drops", "disk writes dropped: no room"),
    "disk_write_errors": ("kvbridge:kv_offload_disk_write_errors", "disk writes that failed"),
}
# key -> transfer_type label: offload bytes (counters) and copy times (samples, summed).
# GB/s of a transfer type: rate(kv_offload_total_bytes) / rate(kv_offload_total_time).
OFFLOAD_BYTES: dict[str, str] = {
    "gpu_to_cpu_bytes": "gpu_to_cpu",
    "cpu_to_gpu_bytes": "cpu_to_gpu",
    "cpu_to_disk_bytes": "cpu_to_disk",
    "disk_to_cpu_bytes": "disk_to_cpu",
}
OFFLOAD_TIME: dict[str, str] = {
    "gpu_to_cpu_time_s": "gpu_to_cpu",
    "cpu_to_gpu_time_s": "cpu_to_gpu",
    "cpu_to_disk_time_s": "cpu_to_disk",
    "disk_to_cpu_time_s": "disk_to_cpu",
}
# Engine gauge key -> (metric name, help); the engine loop sets these after every step.
# Connector gauges come from the connector halves themselves (``kvbridge.connector.gauges``):
# ``kvbridge:<key>{connector=...}``, one series per key a connector reports.
GAUGE_METRICS: dict[str, tuple[str, str]] = {
    "num_requests_running": ("kvbridge:num_requests_running", "requests being computed"),
    "num_requests_waiting": ("kvbridge:num_requests_waiting", "requests waiting or loading KV"),
    "num_free_gpu_blocks": ("kvbridge:num_free_gpu_blocks", "KV blocks an allocation may take"),
    "num_requests_holding_blocks": (
        "kvbridge:num_requests_holding_blocks",
        "finished requests whose blocks the connector still uses",
    ),
    "num_blocks_held_by_connector": (
        "kvbridge:num_blocks_held_by_connector",
        "blocks of finished requests kept for the connector (remote decode reads, late loads)",
    ),
}
_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")


class ServerMetrics:
    """Runs in the server process (any thread); owns a private registry and every series."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "kvbridge:request_success", "finished requests", ["finished_reason"], registry=r
        )
        self.rejected = Counter(
            "kvbridge:request_rejected",
            "requests answered with an HTTP error",
            ["status"],
            registry=r,
        )
        self.prompt_tokens = Counter("kvbridge:prompt_tokens", "prompt tokens", registry=r)
        self.generation_tokens = Counter(
            "kvbridge:generation_tokens", "generated tokens", registry=r
        )
        self.prompt_tokens_by_source = Counter(
            "kvbridge:prompt_tokens_by_source",
            "prompt tokens by where their KV came from",
            ["source"],
            registry=r,
        )
        self.ttft = Histogram(
            "kvbridge:time_to_first_token_seconds",
            "time to first token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "kvbridge:e2e_request_latency_seconds",
            "arrival to last token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("kvbridge:num_requests_in_server", "open requests", registry=r)
        self._samples = {
            key: Histogram(name, doc, ["connector"], buckets=buckets, registry=r)
            for key, (name, doc, buckets) in SAMPLE_METRICS.items()
        }
        self._counters = {
            key: Counter(name, doc, ["connector"], registry=r)
            for key, (name, doc) in COUNTER_METRICS.items()
        }
        self._offload_bytes = Counter(
            "kvbridge:kv_offload_total_bytes", "bytes copied", ["transfer_type"], registry=r
        )
        self._offload_time = Counter(
            "kvbridge:kv_offload_total_time", "seconds spent copying", ["transfer_type"],
            registry=r,
        )  # fmt: skip
        self._gauges: dict[str, Gauge] = {}  # key -> gauge, created when first reported
        self._connector_gauges: dict[str, Gauge | None] = {}  # key -> gauge (label: connector)
        self._other_counters = Counter(
            "kvbridge:connector_events", "other connector counters", ["connector", "key"],
            registry=r,
        )  # fmt: skip
        self._other_samples = Summary(
            "kvbridge:connector_samples", "other connector samples", ["connector", "key"],
            registry=r,
        )  # fmt: skip
        self._other_gauges = Gauge(
            "kvbridge:engine_gauge", "other engine gauges", ["key"], registry=r
        )
        self._other_connector_gauges = Gauge(
            "kvbridge:connector_gauge", "connector gauges whose own name is taken",
            ["connector", "key"], registry=r,
        )  # fmt: skip
        for source in SOURCES:
            self.prompt_tokens_by_source.labels(source=source)

    # -- per request ----------------------------------------------------------------------------
    def observe_first_token(self, ttft: float | None) -> None:
        if ttft is not None:
            self.ttft.observe(ttft)

    def observe_finished(
        self,
        *,
        finish_reason: str | None,
        num_prompt_tokens: int,
        num_generated: int,
        num_cached: int,
        num_external: int,
        remote: bool,
        e2e_seconds: float | None,
    ) -> None:
        """One finished request; ``remote`` says its external tokens came from a P engine."""
        self.requests.labels(finished_reason=finish_reason or "unknown").inc()
        self.prompt_tokens.inc(num_prompt_tokens)
        self.generation_tokens.inc(num_generated)
        local = max(0, num_prompt_tokens - num_cached - num_external)
        by_source = self.prompt_tokens_by_source
        by_source.labels(source="local_compute").inc(local)
        by_source.labels(source="local_cache_hit").inc(num_cached)
        by_source.labels(source="remote" if remote else "cpu_tier").inc(num_external)
        if e2e_seconds is not None:
            self.e2e.observe(e2e_seconds)

    # -- engine-wide ----------------------------------------------------------------------------
    def record_connector_stats(
        self, stats: KVConnectorStats | MultiKVConnectorStats | None, *, name: str
    ) -> None:
        """Fold a stats delta in; ``name`` labels a single (non-Multi) connector."""
        if stats is None:
            return
        if isinstance(stats, MultiKVConnectorStats):
            for child, child_stats in stats.per_connector.items():
                self._record_one(child, child_stats)
        else:
            self._record_one(name, stats)

    def _record_one(self, connector: str, stats: KVConnectorStats) -> None:
        for key, value in stats.data.items():
            if isinstance(value, list):
                self._record_samples(connector, key, value)
            elif value < 0:
                logger.warning("connector %s: stats key %s went down by %s", connector, key, value)
            elif key in self._counters:
                self._counters[key].labels(connector=connector).inc(value)
            elif key in OFFLOAD_BYTES:
                self._offload_bytes.labels(transfer_type=OFFLOAD_BYTES[key]).inc(value)
            else:
                self._other_counters.labels(connector=connector, key=key).inc(value)

    def _record_samples(self, connector: str, key: str, values: list[float]) -> None:
        if key in OFFLOAD_TIME:
            self._offload_time.labels(transfer_type=OFFLOAD_TIME[key]).inc(sum(values))
            return
        target = self._samples.get(key)
        for v in values:
            if target is not None:
                target.labels(connector=connector).observe(v)
            else:
                self._other_samples.labels(connector=connector, key=key).observe(v)

    def set_gauges(self, values: Mapping[str, Any]) -> None:
        """Current engine-wide values (request counts, held blocks, live handles)."""
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if key in GAUGE_METRICS:
                self._gauge(key).set(value)
            else:
                self._other_gauges.labels(key=key).set(value)

    def set_connector_gauges(self, gauges: Mapping[str, Mapping[str, int]]) -> None:
        """The connector halves' gauges now (connector label -> key -> value), as
        ``kvbridge:<key>{connector=label}``."""
        for connector, values in gauges.items():
            for key, value in values.items():
                gauge = self._connector_gauge(key)
                if gauge is None:
                    self._other_connector_gauges.labels(connector=connector, key=key).set(value)
                else:
                    gauge.labels(connector=connector).set(value)

    def _connector_gauge(self, key: str) -> Gauge | None:
        """The series of ``key``; None when its name is taken (it goes to the catch-all)."""
        if key not in self._connector_gauges:
            name = "kvbridge:" + _UNSAFE.sub("_", key)
            doc = GAUGE_HELP.get(key, f"connector gauge {key!r}")
            try:
                gauge: Gauge | None = Gauge(name, doc, ["connector"], registry=self.registry)
            except ValueError:  # another series has this name
                logger.warning(
                    "connector gauge %r: %s is taken; exported with a key label", key, name
                )
                gauge = None
            self._connector_gauges[key] = gauge
        return self._connector_gauges[key]

    def _gauge(self, key: str) -> Gauge:
        gauge = self._gauges.get(key)
        if gauge is None:
            name, doc = GAUGE_METRICS[key]
            gauge = self._gauges[key] = Gauge(name, doc, registry=self.registry)
        return gauge

    def render(self) -> bytes:
        return generate_latest(self.registry)
