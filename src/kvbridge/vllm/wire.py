"""What crosses vLLM's process boundaries for a kvbridge connector: metadata and stats.

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


class KVBridgeStats(KVConnectorStats):
    """kvbridge counters in vLLM's stats pipeline: ``data`` is connector -> key -> value.

    Counters add up and samples (lists) extend when vLLM aggregates workers and steps;
    ``reduce`` flattens to ``"Connector.key"`` (samples as count/mean/max).
    """

    @classmethod
    def wrap(cls, name: str, stats: kvb.Stats | None) -> KVBridgeStats | None:
        if stats is None or stats.is_empty():
            return None
        if isinstance(stats, MultiKVConnectorStats):
            return cls(data={n: dict(s.data) for n, s in stats.per_connector.items()})
        return cls(data={name: dict(stats.data)})

    def per_connector(self) -> dict[str, KVBStats]:
        return {name: KVBStats(data=dict(values)) for name, values in self.data.items()}

    def unwrap(self, name: str) -> kvb.Stats | None:
        """kvbridge's value again: ``name``'s own stats, or per child for a composite."""
        parts = self.per_connector()
        if set(parts) == {name}:
            return parts[name]
        return MultiKVConnectorStats(per_connector=parts) if parts else None

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        mine = self.per_connector()
        for name, values in other.data.items():
            mine.setdefault(name, KVBStats()).aggregate(KVBStats(data=dict(values)))
        self.data = {name: s.data for name, s in mine.items()}
        return self

    def reduce(self) -> dict[str, int | float]:
        return {
            f"{name}.{key}": value
            for name, stats in sorted(self.per_connector().items())
            for key, value in stats.reduce().items()
        }

    def reset(self) -> None:
        self.data = {}

    def is_empty(self) -> bool:
        return not any(self.data.values())

    def to_dict(self) -> dict[str, Any]:
        return self.data
