"""``kvbridge bench nixl --profile-loads N``: where a connector load's time goes, part by part.

The consumer ``NixlWorker`` of ``kvbridge bench nixl`` (merge on) loads the same blocks N times
back to back from a producer process (lease board on), each load followed by one raw READ of
the same bytes (``RawReader``), as the bench pairs them. The consumer's agents (its READs' and
its notifications') are wrapped (``TimedTransport``): every call into NIXL is timed, the data
READ's and the board READ's told apart by their local dlist; the READ's planning and the
whole load (``start_load_kv`` until the request is in ``finished_recving``) are timed too.
"connector Python" is the load's time that no part covers: the worker step's own work (the
timers add ~0.5 us per call to it). ``--cprofile N`` also runs cProfile over the loads and
prints its top N functions (it inflates Python time about twice: it ranks, the table measures).
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from kvbridge.bench import harness
from kvbridge.bench.nixl import _read, block_ids
from kvbridge.bench.nixl_peer import HOST, ProducerProcess, kv_caches, make_spec, nixl_config
from kvbridge.bench.nixl_peer import recv_spec as make_recv_spec
from kvbridge.bench.nixl_raw_reader import RawReader
from kvbridge.connector.base import KVConnectorRole, KVConnectorWorker
from kvbridge.connector.factory import create_connector
from kvbridge.nixl import stats as keys
from kvbridge.nixl.plan_cache import PlanCache
from kvbridge.nixl.transfers import ReadPlan
from kvbridge.nixl.transport import (
    DelegatingTransport,
    DlistHandle,
    Indices,
    NixlTransport,
    XferHandle,
    XferOp,
    XferState,
    XferTelemetry,
)
from kvbridge.nixl.worker import NixlWorker
from kvbridge.nixl.wrapper import NixlWrapper

T = TypeVar("T")
COLUMNS = ("part", "calls / load", "us / load (mean)", "us / call (median)")


class TimedTransport(DelegatingTransport):
    """A transport whose READ and notification calls are timed into ``parts``."""

    def __init__(self, inner: NixlTransport, parts: defaultdict[str, list[float]]) -> None:
        super().__init__(inner)
        self.parts = parts  # shared by the worker's agents (its READs' and its notifications')
        self.board_dlists: set[DlistHandle] = set()  # local dlists of board READs
        self._kind: dict[XferHandle, str] = {}

    def _timed(self, part: str, call: Callable[[], T]) -> T:
        start = time.perf_counter()
        try:
            return call()
        finally:
            self.parts[part].append(time.perf_counter() - start)

    def make_prepped_xfer(
        self,
        op: XferOp,
        local_dlist: DlistHandle,
        local_indices: Indices,
        remote_dlist: DlistHandle,
        remote_indices: Indices,
        notif_msg: bytes = b"",
    ) -> XferHandle:
        kind = "board READ" if local_dlist in self.board_dlists else "data READ"
        handle = self._timed(
            f"{kind}: make",
            lambda: self.inner.make_prepped_xfer(
                op, local_dlist, local_indices, remote_dlist, remote_indices, notif_msg
            ),
        )
        self._kind[handle] = kind
        return handle

    def transfer(self, handle: XferHandle) -> XferState:
        kind = self._kind.get(handle, "READ")
        return self._timed(f"{kind}: post", lambda: self.inner.transfer(handle))

    def check_xfer_state(self, handle: XferHandle) -> XferState:
        kind = self._kind.get(handle, "READ")
        return self._timed(f"{kind}: poll", lambda: self.inner.check_xfer_state(handle))

    def release_xfer_handle(self, handle: XferHandle) -> None:
        kind = self._kind.pop(handle, "READ")
        self._timed(f"{kind}: release", lambda: self.inner.release_xfer_handle(handle))

    def get_xfer_telemetry(self, handle: XferHandle) -> XferTelemetry | None:
        return self._timed("READ telemetry", lambda: self.inner.get_xfer_telemetry(handle))

    def send_notif(self, remote_agent: str, msg: bytes) -> None:
        self._timed("notification (send_notif)", lambda: self.inner.send_notif(remote_agent, msg))


@contextmanager
def timed_plan(parts: defaultdict[str, list[float]]) -> Iterator[None]:
    """Time the reader's READ planning (``PlanCache.plan``) into ``parts`` (restored on exit)."""
    plan = PlanCache.plan

    def timed(self: PlanCache, *args: Any, **kwargs: Any) -> ReadPlan:
        start = time.perf_counter()
        try:
            return plan(self, *args, **kwargs)
        finally:
            parts["plan (PlanCache.plan)"].append(time.perf_counter() - start)

    PlanCache.plan = timed  # type: ignore[method-assign]
    try:
        yield
    finally:
        PlanCache.plan = plan  # type: ignore[method-assign]


def profile(args: Any) -> harness.Report:
    """``args``: the bench's (layers, blocks, block_kib, progress_delay_us) and profile_loads,
    profile_pattern, cprofile."""
    spec = make_spec(args.layers, args.blocks, args.block_kib)
    delay = {"progress_delay_us": args.progress_delay_us}
    loads = args.profile_loads
    transports: list[TimedTransport] = []
    parts: defaultdict[str, list[float]] = defaultdict(list)

    def factory(name: str) -> NixlTransport:
        transports.append(TimedTransport(NixlWrapper(name, **delay), parts))
        return transports[-1]

    producer = ProducerProcess(args.layers, args.blocks, args.block_kib, delay)
    try:
        raw = RawReader(spec, HOST, producer.port, **delay)
        config = nixl_config("kv_consumer", "profile-consumer", nixl_wrapper=factory, **delay)
        worker = create_connector(config, KVConnectorRole.WORKER, spec)
        try:
            cache = kv_caches(spec, None)  # referenced until shutdown: NIXL writes it
            worker.register_kv_caches(cache)
            report = _run(worker, transports[0], raw, producer, args)
        finally:
            worker.shutdown()
            leaked = raw.close()
        producer.wait_released(loads + 1)
    finally:
        released = producer.stop()
    report.notes.append(
        f"producer holds released by done notifications: {released}/{loads + 1}; raw reader "
        f"leaked {leaked}; the connector's transport leaked {getattr(worker, 'leaked', None)}"
    )
    return report


def _run(
    worker: KVConnectorWorker,
    timed: TimedTransport,
    raw: RawReader,
    producer: ProducerProcess,
    args: Any,
) -> harness.Report:
    if not isinstance(worker, NixlWorker) or worker.registered.reader is None:
        raise TypeError(f"a consumer NixlWorker is profiled, not {type(worker).__name__}")
    reader = worker.registered.reader
    if reader.boards is not None:
        timed.board_dlists.add(reader.boards.dlist)
    ids = block_ids(args.profile_pattern, args.blocks)
    specs = [
        make_recv_spec(f"profile-{i}", ids, producer.port) for i in range(args.profile_loads + 1)
    ]
    producer.hold([s.request_id for s in specs], ids)
    loads: list[float] = []
    raws: list[float] = []
    with raw.prepared([ids], [ids], merge=True) as xfer:
        _read(worker, specs[0])  # the handshake
        timed.parts.clear()
        profiler = cProfile.Profile() if args.cprofile else None
        with timed_plan(timed.parts):
            if profiler is not None:
                profiler.enable()
            for spec in specs[1:]:
                loads.append(_read(worker, spec))
                raws.append(raw.read(xfer).seconds)
            if profiler is not None:
                profiler.disable()
    title = (
        f"One connector load ({args.profile_pattern}, {args.blocks} blocks x {args.layers} "
        f"layers x {args.block_kib} KiB) part by part, {args.profile_loads} loads"
    )
    out = harness.Report("nixl_profile", title, COLUMNS, words=COLUMNS[:1])
    n = len(loads)
    covered = 0.0
    for part, samples in sorted(timed.parts.items()):
        covered += sum(samples)
        out.add(
            [
                part,
                f"{len(samples) / n:.2f}",
                f"{1e6 * sum(samples) / n:.1f}",
                f"{1e6 * statistics.median(samples):.1f}",
            ],
            {"part": part, "calls": len(samples), "seconds": sum(samples) / n},
        )
    rest = (sum(loads) - covered) / n
    out.add(["connector Python (the rest)", "", f"{1e6 * rest:.1f}", ""], {"rest_s": rest})
    out.add(["load (mean)", "1.00", f"{1e6 * statistics.mean(loads):.1f}", ""])
    ratio = harness.paired_ratio(loads, raws)
    stats = worker.stats.data
    out.notes.append(
        f"lease questions sent: {reader.confirmer.num_queries} (the handshake's load included); "
        f"loads landed by the board: {stats.get(keys.BOARD_CONFIRMS, 0)}, by a lease answer: "
        f"{stats.get(keys.CONFIRMS_WITH_READ, 0)}"
    )
    out.notes.append(
        f"load median {1e3 * statistics.median(loads):.3f} ms, raw READ median "
        f"{1e3 * statistics.median(raws):.3f} ms (make + post + poll + release), paired ratio "
        f"raw / load {ratio:.2f}"
    )
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.cprofile)
    return out
