"""Connector counters that aggregate across steps and workers and serialise with msgspec."""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

Value = int | float | list[float]


class KVConnectorStats(msgspec.Struct, kw_only=True):
    """Named counters (ints/floats add up) and samples (lists extend); one per connector.

    ``reduce()`` turns samples into count/mean/max so a log line or metric can show them.
    """

    data: dict[str, Value] = msgspec.field(default_factory=dict)

    def incr(self, key: str, amount: int | float = 1) -> None:
        current = self.data.get(key, 0)
        if isinstance(current, list):
            raise TypeError(f"stats key {key!r} holds samples; use observe()")
        self.data[key] = current + amount

    def observe(self, key: str, value: float) -> None:
        samples = self.data.setdefault(key, [])
        if not isinstance(samples, list):
            raise TypeError(f"stats key {key!r} holds a counter; use incr()")
        samples.append(float(value))

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        """Fold ``other`` into ``self`` (in place) and return ``self``."""
        for key, value in other.data.items():
            if isinstance(value, list):
                self.data.setdefault(key, [])
                mine = self.data[key]
                if not isinstance(mine, list):
                    raise TypeError(f"stats key {key!r}: counter in one, samples in the other")
                mine.extend(value)
            else:
                mine_value = self.data.get(key, 0)
                if isinstance(mine_value, list):
                    raise TypeError(f"stats key {key!r}: samples in one, counter in the other")
                self.data[key] = mine_value + value
        return self

    def reduce(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, value in sorted(self.data.items()):
            if isinstance(value, list):
                out[f"{key}.count"] = float(len(value))
                out[f"{key}.mean"] = sum(value) / len(value) if value else 0.0
                out[f"{key}.max"] = max(value) if value else 0.0
            else:
                out[key] = float(value)
        return out

    def is_empty(self) -> bool:
        return not self.data

    def reset(self) -> None:
        self.data = {}

    def take(self) -> KVConnectorStats | None:
        """Return a copy of the current counters and reset them; ``None`` when empty."""
        if self.is_empty():
            return None
        out = KVConnectorStats(data=self.data)
        self.data = {}
        return out

    def encode(self) -> bytes:
        return msgspec.msgpack.encode(self)

    @classmethod
    def decode(cls, payload: bytes) -> KVConnectorStats:
        return msgspec.msgpack.decode(payload, type=cls)


class MultiKVConnectorStats(msgspec.Struct, kw_only=True):
    """Stats of a MultiConnector: one ``KVConnectorStats`` per child class name."""

    per_connector: dict[str, KVConnectorStats] = msgspec.field(default_factory=dict)

    def add(self, name: str, stats: KVConnectorStats | None) -> None:
        if stats is None or stats.is_empty():
            return
        self.per_connector.setdefault(name, KVConnectorStats()).aggregate(stats)

    @classmethod
    def collect(
        cls, named: Iterable[tuple[str, KVConnectorStats | MultiKVConnectorStats | None]]
    ) -> MultiKVConnectorStats | None:
        """Group children's stats by name (nested composites are flattened); None if empty."""
        stats = cls()
        for name, child in named:
            if isinstance(child, MultiKVConnectorStats):
                stats.aggregate(child)
            else:
                stats.add(name, child)
        return None if stats.is_empty() else stats

    def aggregate(self, other: MultiKVConnectorStats) -> MultiKVConnectorStats:
        for name, stats in other.per_connector.items():
            self.add(name, stats)
        return self

    def reduce(self) -> dict[str, dict[str, float]]:
        return {name: s.reduce() for name, s in sorted(self.per_connector.items())}

    def is_empty(self) -> bool:
        return all(s.is_empty() for s in self.per_connector.values())
