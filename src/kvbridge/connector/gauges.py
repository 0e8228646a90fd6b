"""Connector gauges (SPEC §7): what each connector half holds right now, for leak checks.

A half reports a snapshot, never a delta (``get_kv_connector_gauges``): key -> current value,
every value 0 on an engine with nothing in flight and nothing held, so a value left above 0
after a drain is a leak. A MultiConnector reports its children's under one label per child
(``MultiKVConnectorGauges``). Whoever exports them (the server, the soak, the vLLM adapter)
names the series ``kvbridge:<key>`` with a ``connector`` label and keeps no table of its own.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Protocol

import msgspec

GaugeValues = dict[str, int]  # key -> current value
LabelledGauges = dict[str, GaugeValues]  # connector label -> its gauges

# The keys kvbridge's connectors report, with the help text of their series.
GAUGE_HELP: dict[str, str] = {
    "num_blocks_held_for_remote_decode": "blocks kept for a remote decode engine to read",
    "num_live_leases": "P/D leases not yet released or expired",
    "nixl_num_inflight_xfer_handles": "NIXL transfer handles not yet released",
    "nixl_num_inflight_dlist_handles": (
        "NIXL descriptor-list handles beyond the standing ones (the worker's own cache's and "
        "one per attached producer not marked stale)"
    ),
    "nixl_num_inflight_loads": "remote loads (NIXL READs and their checks) not yet ended",
    "nixl_num_remote_agents": "producer agents loaded (attached); not a leak gauge",
    "num_pinned_cpu_blocks": "CPU tier blocks pinned by a load",
    "num_storing_cpu_blocks": "CPU tier blocks reserved by a store in flight",
    "kv_offload_num_inflight_copies": "CPU tier copy jobs (loads and stores) not yet ended",
}
# Gauges that count what a connector keeps while idle (0 is not expected after a drain).
STANDING_GAUGES = frozenset({"nixl_num_remote_agents"})


class MultiKVConnectorGauges(msgspec.Struct, frozen=True, kw_only=True):
    """Gauges of a MultiConnector: one ``GaugeValues`` per child label (see ``child_labels``)."""

    per_connector: LabelledGauges = msgspec.field(default_factory=dict)

    @classmethod
    def collect(cls, labelled: Iterable[tuple[str, Gauges]]) -> MultiKVConnectorGauges:
        """Children's gauges by label; a nested composite's are ``label/its child's label``."""
        out: LabelledGauges = {}
        for label, gauges in labelled:
            if isinstance(gauges, MultiKVConnectorGauges):
                for inner, values in gauges.per_connector.items():
                    out[f"{label}/{inner}"] = dict(values)
            elif gauges:
                out[label] = dict(gauges)
        return cls(per_connector=out)


Gauges = GaugeValues | MultiKVConnectorGauges


class ReportsGauges(Protocol):
    """A connector half (scheduler or worker)."""

    def get_kv_connector_gauges(self) -> Gauges: ...


def child_labels(names: list[str]) -> list[str]:
    """One label per child: its connector name, with ``[index]`` when two share a name."""
    counts = Counter(names)
    return [n if counts[n] == 1 else f"{n}[{i}]" for i, n in enumerate(names)]


def label_gauges(gauges: Gauges, name: str) -> LabelledGauges:
    """``gauges`` by connector label: a leaf's under ``name``, a composite's per child."""
    if isinstance(gauges, MultiKVConnectorGauges):
        return {label: dict(values) for label, values in gauges.per_connector.items()}
    return {name: dict(gauges)} if gauges else {}


def merge_labelled(parts: Iterable[Mapping[str, Mapping[str, int]]]) -> LabelledGauges:
    """Sum per (label, key): a connector's scheduler and worker halves, or several workers."""
    out: LabelledGauges = {}
    for part in parts:
        for label, values in part.items():
            mine = out.setdefault(label, {})
            for key, value in values.items():
                mine[key] = mine.get(key, 0) + value
    return out


def connector_gauges(name: str, *halves: ReportsGauges | None) -> LabelledGauges:
    """An engine's connector gauges: its halves' (``None`` skipped), labelled, summed."""
    return merge_labelled(
        label_gauges(half.get_kv_connector_gauges(), name) for half in halves if half is not None
    )


def nonzero(gauges: LabelledGauges, *, standing: bool = False) -> list[str]:
    """``"label key=value"`` for every leak gauge above 0 (``standing``: the others too)."""
    return [
        f"{label} {key}={value}"
        for label, values in sorted(gauges.items())
        for key, value in sorted(values.items())
        if value and (standing or key not in STANDING_GAUGES)
    ]
