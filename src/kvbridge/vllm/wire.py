"""What crosses vLLM's process boundaries for a kvbridge connector: metadata, stats, gauges.

vLLM ships these objects between its scheduler, workers and front end itself (pickled); each
one wraps kvbridge's own msgspec value untouched, and pickles it as kvbridge's metadata codec
bytes, so what crosses the process boundary is typed msgpack, decoded to known classes only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from kvbridge.connector import base as kvb
from kvbridge.connector.codec import decode_metadata, encode_metadata
from kvbridge.connector.gauges import LabelledGauges
from kvbridge.connector.stats import KVConnectorStats as KVBStats
from kvbridge.connector.stats import MultiKVConnectorStats


class _CodecPickled:
    """Pickles ``inner`` through kvbridge's metadata codec."""

    inner: Any
    _kind: type

    def __getstate__(self) -> bytes:
        return encode_metadata(self.inner)

    def __setstate__(self, state: bytes) -> None:
        self.inner = decode_metadata(state, self._kind)


@dataclass
class KVBridgeMetadata(_CodecPickled, KVConnectorMetadata):
    """Scheduler -> workers, one step: the kvbridge scheduler half's metadata."""

    inner: kvb.KVConnectorMetadata
    _kind = kvb.KVConnectorMetadata


@dataclass
class KVBridgeHandshake(_CodecPickled, KVConnectorHandshakeMetadata):
    """Worker -> its scheduler, once at start-up: the kvbridge worker half's handshake."""

    inner: kvb.KVConnectorHandshakeMetadata
    _kind = kvb.KVConnectorHandshakeMetadata


@dataclass
class KVBridgeWorkerMetadata(_CodecPickled, KVConnectorWorkerMetadata):
    """Worker -> scheduler, one step: the kvbridge worker half's metadata (one worker)."""

    inner: kvb.KVConnectorWorkerMetadata
    _kind = kvb.KVConnectorWorkerMetadata

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        raise RuntimeError(
            "kvbridge's vLLM connectors run with one worker per engine (tensor_parallel_size 1); "
            "worker metadata of two workers cannot be merged"
        )


GAUGE_PREFIX = "gauge:"  # data key of a gauge snapshot: "gauge:<connector label>"


class KVBridgeStats(KVConnectorStats):
    """kvbridge counters in vLLM's stats pipeline: ``data`` is connector -> key -> value.

    Counters add up and samples (lists) extend when vLLM aggregates workers and steps;
    ``reduce`` flattens to ``"Connector.key"`` (samples as count/mean/max). Gauge snapshots
    ride along under ``"gauge:<connector label>"``; the newer one wins when they meet.
    """

    @classmethod
    def wrap(
        cls, name: str, stats: kvb.Stats | None, gauges: LabelledGauges | None = None
    ) -> KVBridgeStats | None:
        data: dict[str, Any] = {}
        if isinstance(stats, MultiKVConnectorStats):
            data = {n: dict(s.data) for n, s in stats.per_connector.items() if not s.is_empty()}
        elif stats is not None and not stats.is_empty():
            data = {name: dict(stats.data)}
        for label, values in (gauges or {}).items():
            data[GAUGE_PREFIX + label] = dict(values)
        return cls(data=data) if data else None

    def gauges(self) -> LabelledGauges:
        """The gauge snapshots carried: connector label -> key -> value."""
        return {
            name.removeprefix(GAUGE_PREFIX): dict(values)
            for name, values in self.data.items()
            if name.startswith(GAUGE_PREFIX)
        }

    def per_connector(self) -> dict[str, KVBStats]:
        return {
            name: KVBStats(data=dict(values))
            for name, values in self.data.items()
            if not name.startswith(GAUGE_PREFIX)
        }

    def unwrap(self, name: str) -> kvb.Stats | None:
        """kvbridge's value again: ``name``'s own stats, or per child for a composite."""
        parts = self.per_connector()
        if set(parts) == {name}:
            return parts[name]
        return MultiKVConnectorStats(per_connector=parts) if parts else None

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        mine, gauges = self.per_connector(), self.gauges()
        for name, values in other.data.items():
            if name.startswith(GAUGE_PREFIX):
                gauges.setdefault(name.removeprefix(GAUGE_PREFIX), {}).update(values)
            else:
                mine.setdefault(name, KVBStats()).aggregate(KVBStats(data=dict(values)))
        self.data = {name: s.data for name, s in mine.items()}
        self.data.update((GAUGE_PREFIX + label, values) for label, values in gauges.items())
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {
            f"{name}.{key}": value
            for name, stats in sorted(self.per_connector().items())
            for key, value in stats.reduce().items()
        }
        for label, values in sorted(self.gauges().items()):
            out.update((f"{GAUGE_PREFIX}{label}.{key}", v) for key, v in sorted(values.items()))
        return out

    def reset(self) -> None:
        self.data = {}

    def is_empty(self) -> bool:
        return not any(self.data.values())

    def to_dict(self) -> dict[str, Any]:
        return self.data
