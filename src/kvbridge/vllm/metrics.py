"""kvbridge's connector counters on vLLM's ``/metrics`` (``kvbridge:<key>``, label ``connector``).

vLLM aggregates each step's ``KVBridgeStats`` (connector -> key -> value) and hands the data to
``observe``: counters (ints/floats) become Prometheus counters, samples (lists, e.g. copy
times) histograms, gauge snapshots (``gauge:<connector>``, sent when they change) gauges.
Metrics are created on first sight of a key and shared by every engine of the process
(Prometheus' registry is process-wide; the ``engine`` label tells them apart).
"""

from __future__ import annotations

import re
import threading
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics

from kvbridge.connector.gauges import GAUGE_HELP
from kvbridge.vllm.wire import GAUGE_PREFIX

_lock = threading.Lock()
_metrics: dict[str, Any] = {}  # metric name -> the one Counter/Histogram/Gauge of the process
_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")


class KVBridgePromMetrics(KVConnectorPromMetrics):
    """Exports kvbridge's stats keys; one time series per (engine labels, connector)."""

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = [*self.per_engine_labelvalues[engine_idx]]
        for connector, values in transfer_stats_data.items():
            if connector.startswith(GAUGE_PREFIX):  # a snapshot: set, never added up
                label = connector.removeprefix(GAUGE_PREFIX)
                for key, value in values.items():
                    self._metric(key, self._gauge_cls).labels(*labels, label).set(value)
                continue
            for key, value in values.items():
                if isinstance(value, list):
                    histogram = self._metric(key, self._histogram_cls)
                    child = histogram.labels(*labels, connector)
                    for sample in value:
                        child.observe(sample)
                elif isinstance(value, int | float) and value >= 0:
                    self._metric(key, self._counter_cls).labels(*labels, connector).inc(value)

    def _metric(self, key: str, cls: Any) -> Any:
        name = "kvbridge:" + _UNSAFE.sub("_", key)
        with _lock:
            metric = _metrics.get(name)
            if metric is None:
                doc = GAUGE_HELP.get(key, f"kvbridge connector stat {key!r} (see kvbridge's docs)")
                # A gauge shows the engine's last value when vLLM runs several API processes.
                mode = {"multiprocess_mode": "mostrecent"} if cls is self._gauge_cls else {}
                metric = cls(
                    name=name,
                    documentation=doc,
                    labelnames=[*self._labelnames, "connector"],
                    **mode,
                )
                _metrics[name] = metric
            return metric
