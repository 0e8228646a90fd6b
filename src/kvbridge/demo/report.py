"""RunSummary: what one demo run measured (client timings + the servers' /metrics), and the table.

Every number comes from this run: times to first token are taken at the client (through the
proxy, streaming); token, byte and time counters are read from the servers' Prometheus series.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from kvbridge.demo.workload import RequestRecord

logger = logging.getLogger(__name__)


def fetch_metrics(url: str, timeout_s: float = 10.0) -> str:
    r = httpx.get(url.rstrip("/") + "/metrics", timeout=timeout_s, trust_env=False)
    r.raise_for_status()
    return r.text


class Scrape:
    """One server's ``/metrics`` answer, parsed once; with ``since`` (an earlier answer of the
    same server), each series' growth since then: counters count only what came after."""

    def __init__(self, text: str, since: str = "") -> None:
        self._samples = _samples(text)
        if since:
            earlier = {_key(name, labels): v for name, labels, v in _samples(since)}
            self._samples = [
                (name, labels, value - earlier.get(_key(name, labels), 0.0))
                for name, labels, value in self._samples
            ]

    def has(self, sample_name: str) -> bool:
        return any(name == sample_name for name, _, _ in self._samples)

    def sum(self, sample_name: str, **labels: str) -> float:
        """Sum of the samples named ``sample_name`` whose labels include ``labels`` (0 if none)."""
        return sum(
            value
            for name, have, value in self._samples
            if name == sample_name and all(have.get(k) == v for k, v in labels.items())
        )


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (sample.name, sample.labels, float(sample.value))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def _key(name: str, labels: dict[str, str]) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated ``q``-th percentile (0..100); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class Moved:
    """Bytes moved and the time spent moving them, as the connectors measured it."""

    num_bytes: float
    seconds: float
    count: float = 0.0

    @property
    def gb_per_s(self) -> float | None:
        return self.num_bytes / self.seconds / 1e9 if self.seconds > 0 else None


@dataclass(frozen=True)
class DiskSummary:
    """The disk tier's counters on both servers."""

    hits: float  # blocks read back from disk
    misses: float  # lookups the disk could not extend
    to_disk: Moved
    from_disk: Moved
    evictions: float
    corrupt: float


@dataclass(frozen=True)
class RunSummary:
    """One stack's run: client-side request outcomes and server-side counters."""

    label: str
    records: tuple[RequestRecord, ...]
    wall_s: float
    prefill_computed: float  # prompt tokens computed on the prefill server
    prefill_cache_hits: float  # ... served by its GPU prefix cache
    decode_cache_hits: float  # prompt tokens the decode server already held
    cpu_hit_tokens: float  # prompt tokens loaded from a CPU tier (both servers)
    nixl_tokens: float  # prompt tokens the decode server read over NIXL
    nixl: Moved
    to_cpu: Moved
    from_cpu: Moved
    cpu_evictions: float
    fallbacks: float  # requests the proxy sent to decode without a prefill
    identical: int = 0
    disk: DiskSummary | None = None  # the disk tier's counters (when it is on)

    @classmethod
    def collect(
        cls,
        label: str,
        records: Sequence[RequestRecord],
        wall_s: float,
        *,
        prefill: str,
        decode: str,
        proxy: str,
        before: dict[str, str] | None = None,
    ) -> RunSummary:
        """From the records and the /metrics texts of the prefill, decode and proxy; with
        ``before`` (their texts by those names before the workload), counted from then."""
        before = before or {}
        p, d = Scrape(prefill, before.get("prefill", "")), Scrape(decode, before.get("decode", ""))
        by_source = "kvbridge:prompt_tokens_by_source_total"

        def both(name: str, **labels: str) -> float:
            return p.sum(name, **labels) + d.sum(name, **labels)

        def offload(kind: str) -> Moved:
            return Moved(
                both("kvbridge:kv_offload_total_bytes_total", transfer_type=kind),
                both("kvbridge:kv_offload_total_time_total", transfer_type=kind),
            )

        return cls(
            label=label,
            records=tuple(records),
            wall_s=wall_s,
            prefill_computed=p.sum(by_source, source="local_compute"),
            prefill_cache_hits=p.sum(by_source, source="local_cache_hit"),
            decode_cache_hits=d.sum(by_source, source="local_cache_hit"),
            cpu_hit_tokens=both("kvbridge:kv_offload_hit_tokens_total"),
            nixl_tokens=d.sum(by_source, source="remote"),
            nixl=Moved(
                d.sum("kvbridge:nixl_bytes_transferred_sum"),
                d.sum("kvbridge:nixl_xfer_time_seconds_sum"),
                d.sum("kvbridge:nixl_bytes_transferred_count"),
            ),
            to_cpu=offload("gpu_to_cpu"),
            from_cpu=offload("cpu_to_gpu"),
            cpu_evictions=both("kvbridge:kv_offload_evictions_total"),
            fallbacks=Scrape(proxy, before.get("proxy", "")).sum(
                "kvbridge:proxy_requests_total", route="local_prefill"
            ),
            disk=DiskSummary(
                hits=both("kvbridge:kv_offload_disk_hits_total"),
                misses=both("kvbridge:kv_offload_disk_misses_total"),
                to_disk=offload("cpu_to_disk"),
                from_disk=offload("disk_to_cpu"),
                evictions=both("kvbridge:kv_offload_disk_evictions_total"),
                corrupt=both("kvbridge:kv_offload_disk_corrupt_records_total"),
            )
            if any(s.has("kvbridge:kv_offload_disk_bytes") for s in (p, d))
            else None,
        )

    @property
    def num_ok(self) -> int:
        return sum(1 for r in self.records if r.error is None)

    def ttft_ms(self, q: float) -> float | None:
        value = percentile([r.ttft_s for r in self.records if r.ttft_s is not None], q)
        return None if value is None else value * 1000.0


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _bytes(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _moved(m: Moved, *, with_count: bool = False) -> str:
    """``1.4 MiB[ in 12], 0.52 GB/s``: bytes[, how many transfers] and the measured rate."""
    if m.num_bytes == 0:
        return "0"
    rate = m.gb_per_s
    count = f" in {m.count:.0f}" if with_count else ""
    return _bytes(m.num_bytes) + count + ("" if rate is None else f", {rate:.2f} GB/s")


def render_report(console: Console, runs: Sequence[RunSummary]) -> None:
    """The comparison table, one column per run."""
    table = Table(title="kvbridge demo: P/D over NIXL with CPU offload", title_justify="left")
    table.add_column("", style="bold", no_wrap=True)
    for run in runs:
        table.add_column(run.label, justify="right")
    rows: list[tuple[str, list[str]]] = [
        ("requests (ok)", [f"{len(r.records)} ({r.num_ok})" for r in runs]),
        ("TTFT p50 / p95 (ms)", [f"{_num(r.ttft_ms(50))} / {_num(r.ttft_ms(95))}" for r in runs]),
        ("prefill: tokens computed", [_num(r.prefill_computed) for r in runs]),
        ("prefill: prefix-cache hits", [_num(r.prefill_cache_hits) for r in runs]),
        ("CPU offload hits (tokens)", [_num(r.cpu_hit_tokens) for r in runs]),
        ("CPU offload GPU->CPU", [_moved(r.to_cpu) for r in runs]),
        ("CPU offload CPU->GPU", [_moved(r.from_cpu) for r in runs]),
        ("CPU blocks evicted", [_num(r.cpu_evictions) for r in runs]),
        *_disk_rows(runs),
        ("decode: prefix-cache hits", [_num(r.decode_cache_hits) for r in runs]),
        ("tokens moved over NIXL", [_num(r.nixl_tokens) for r in runs]),
        ("NIXL reads", [_moved(r.nixl, with_count=True) for r in runs]),
        ("proxy fallbacks", [_num(r.fallbacks) for r in runs]),
        ("workload wall time (s)", [_num(r.wall_s, 1) for r in runs]),
        ("outputs identical", [f"{r.identical}/{len(r.records)}" for r in runs]),
    ]
    for name, cells in rows:
        table.add_row(name, *cells)
    console.print(table)


def _disk_rows(runs: Sequence[RunSummary]) -> list[tuple[str, list[str]]]:
    """The disk tier's rows, when a run had it on."""
    if all(r.disk is None for r in runs):
        return []

    def cells(fn: Callable[[DiskSummary], str]) -> list[str]:
        return ["-" if r.disk is None else fn(r.disk) for r in runs]

    return [
        ("disk tier hits / misses", cells(lambda d: f"{_num(d.hits)} / {_num(d.misses)}")),
        ("disk tier CPU->disk", cells(lambda d: _moved(d.to_disk))),
        ("disk tier disk->CPU", cells(lambda d: _moved(d.from_disk))),
        (
            "disk records evicted / corrupt",
            cells(lambda d: f"{_num(d.evictions)} / {_num(d.corrupt)}"),
        ),
    ]
