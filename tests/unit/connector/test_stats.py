"""KVConnectorStats aggregation and serialisation."""

from __future__ import annotations

import pytest

from kvbridge.connector.stats import KVConnectorStats, MultiKVConnectorStats


def test_counters_add_and_samples_extend() -> None:
    a = KVConnectorStats()
    a.incr("bytes", 10)
    a.observe("xfer_s", 0.5)
    b = KVConnectorStats()
    b.incr("bytes", 5)
    b.observe("xfer_s", 1.5)
    a.aggregate(b)
    assert a.reduce() == {"bytes": 15.0, "xfer_s.count": 2.0, "xfer_s.mean": 1.0, "xfer_s.max": 1.5}


def test_round_trip_and_take_resets() -> None:
    a = KVConnectorStats()
    a.incr("n", 3)
    assert KVConnectorStats.decode(a.encode()) == a
    taken = a.take()
    assert taken is not None and taken.data == {"n": 3}
    assert a.is_empty() and a.take() is None


def test_mixing_counter_and_samples_is_an_error() -> None:
    a = KVConnectorStats()
    a.incr("k")
    with pytest.raises(TypeError, match="counter"):
        a.observe("k", 1.0)
    b = KVConnectorStats(data={"k": [1.0]})
    with pytest.raises(TypeError, match="samples"):
        a.aggregate(b)


def test_multi_stats_group_by_name() -> None:
    m = MultiKVConnectorStats()
    m.add("Nixl", KVConnectorStats(data={"n": 1}))
    m.add("Nixl", KVConnectorStats(data={"n": 2}))
    m.add("CPU", None)
    assert m.reduce() == {"Nixl": {"n": 3.0}}
