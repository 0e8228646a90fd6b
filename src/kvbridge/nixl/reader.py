"""KVReader: the consumer's remote loads, from handshake to READ completion or failure.

Per request::

    add -> [handshake in the background] -> attach remote (once per engine) -> post one READ
        -> poll: DONE -> finished_recving
                 ERR / timeout / handshake error -> load-error blocks + finished_recving
    abort (the request ended meanwhile) -> finished_recving, without load errors, once nothing
        writes into its blocks

Every path releases its transfer handle and per-transfer dlists; a remote whose READ failed is
detached once idle and handshaken afresh (the producer may have restarted).
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from kvbridge.connector.stats import KVConnectorStats
from kvbridge.nixl import stats as keys
from kvbridge.nixl.handshake import HandshakeError, NixlAgentMetadata
from kvbridge.nixl.metadata import RecvSpec, RemoteRelease, encode_notif
from kvbridge.nixl.remotes import TRANSPORT_ERRORS, RemoteEngine, RemoteEngines, memory_type
from kvbridge.nixl.transfers import KVRegions, ReadPlan, plan_read
from kvbridge.nixl.transport import (
    LOCAL_AGENT,
    DlistHandle,
    NixlTransport,
    NixlTransportError,
    XferHandle,
    XferState,
)

logger = logging.getLogger(__name__)


@dataclass
class _Recv:
    spec: RecvSpec
    started: float
    future: Future[NixlAgentMetadata] | None = None
    remote: RemoteEngine | None = None
    handle: XferHandle | None = None
    dlists: list[DlistHandle] = field(default_factory=list)  # per-transfer (merged) dlists
    plan: ReadPlan | None = None
    posted_at: float = 0.0
    posted_wall: float = 0.0
    aborted: bool = False
    report: bool = True  # an aborted load is still reported in finished_recving when it ends


@dataclass(frozen=True)
class ReaderConfig:
    transfer_timeout_s: float
    heartbeat_interval_s: float
    merge_contiguous_blocks: bool
    slow_transfer_s: float


class KVReader:
    """Runs in a consumer worker; owns the in-flight loads: their READs and transient dlists."""

    def __init__(
        self,
        transport: NixlTransport,
        local: KVRegions,
        local_dlist: DlistHandle,
        group_layers: list[list[int]],
        engines: RemoteEngines,
        config: ReaderConfig,
        stats: KVConnectorStats,
    ) -> None:
        self._t = transport
        self._local = local
        self._local_dlist = local_dlist
        self._group_layers = group_layers
        self.engines = engines
        self._cfg = config
        self._stats = stats
        self._recvs: dict[str, _Recv] = {}  # request id -> load in progress
        self._zombies: list[XferHandle] = []  # handles whose release failed; retried
        self._recving: set[str] = set()
        self._invalid: set[int] = set()
        self._failures: dict[str, str] = {}

    # -- inputs ---------------------------------------------------------------------------------
    def add(self, spec: RecvSpec, now: float) -> None:
        if spec.request_id in self._recvs:
            logger.warning("load of %s requested twice; ignoring the second", spec.request_id)
            return
        recv = _Recv(spec, now)
        self._recvs[spec.request_id] = recv
        if spec.fail_reason is not None:
            self._fail(recv, spec.fail_reason)

    def abort(self, request_id: str, *, report: bool = True) -> None:
        """Stop loading into the request's blocks; with ``report`` it is reported in
        finished_recving once nothing writes into them (the engine frees them then)."""
        recv = self._recvs.get(request_id)
        if recv is None:
            if report:
                self._recving.add(request_id)
            return
        recv.aborted, recv.report = True, report
        if recv.handle is None:
            self.engines.notify(
                recv.spec.remote_engine_id, "release", [recv.spec.remote_request_id]
            )
            self._end(recv)

    def release(self, rel: RemoteRelease) -> None:
        """Tell an attached producer to free a request's blocks (else its lease lapses)."""
        if not self.engines.notify(rel.remote_engine_id, "release", [rel.remote_request_id]):
            logger.debug("no attached engine %s to release %s", rel.remote_engine_id, rel)

    # -- progress -------------------------------------------------------------------------------
    def poll(self, now: float) -> None:
        self._retry_zombies()
        for engine_id in self.engines.detach_idle_stale():
            for recv in self._recvs.values():
                if recv.spec.remote_engine_id == engine_id:
                    recv.future = None  # handshake afresh
        for recv in list(self._recvs.values()):
            if recv.handle is None:
                self._advance(recv, now)
            else:
                self._check(recv, recv.handle, now)
        for recv in list(self._recvs.values()):
            if now - recv.started > self._cfg.transfer_timeout_s:
                reading = recv.handle is not None
                if recv.remote is not None:
                    recv.remote.stale = True
                self._stats.incr(keys.FAILED_TRANSFERS if reading else keys.FAILED_HANDSHAKES)
                what = "READ" if reading else "handshake"
                self._fail(recv, f"timed out after {self._cfg.transfer_timeout_s:g}s ({what})")
        waiting: dict[str, list[str]] = {}
        for recv in self._recvs.values():
            if recv.remote is not None and not recv.aborted:
                waiting.setdefault(recv.remote.engine_id, []).append(recv.spec.remote_request_id)
        self.engines.heartbeat(now, waiting, self._cfg.heartbeat_interval_s)

    def _advance(self, recv: _Recv, now: float) -> None:
        spec = recv.spec
        remote = self.engines.get(spec.remote_engine_id)
        if remote is not None:
            if not remote.stale:
                self._post(recv, remote, now)
            return
        if recv.future is None:
            recv.future = self.engines.fetch(
                spec.remote_engine_id, spec.remote_host, spec.remote_port
            )
        if not recv.future.done():
            return
        error = (
            HandshakeError("handshake cancelled")
            if recv.future.cancelled()
            else recv.future.exception()
        )
        if error is not None:
            self._stats.incr(keys.FAILED_HANDSHAKES)
            self._fail(
                recv,
                f"handshake with engine {spec.remote_engine_id} at "
                f"{spec.remote_host}:{spec.remote_port} failed: {error}",
            )
            return
        try:
            remote = self.engines.attach(recv.future.result())
        except TRANSPORT_ERRORS as e:
            self._stats.incr(keys.FAILED_HANDSHAKES)
            self._fail(recv, f"cannot attach engine {spec.remote_engine_id}: {e}")
            return
        self._post(recv, remote, now)

    def _post(self, recv: _Recv, remote: RemoteEngine, now: float) -> None:
        spec = recv.spec
        try:
            plan = plan_read(
                self._local,
                remote.regions,
                self._group_layers,
                spec.local_block_ids,
                spec.remote_block_ids,
                merge=self._cfg.merge_contiguous_blocks,
            )
        except ValueError as e:
            self._fail(recv, f"bad block ids: {e}")
            return
        if plan.num_block_layers == 0:
            self.engines.notify(spec.remote_engine_id, "done", [spec.remote_request_id])
            self._end(recv)
            return
        recv.remote, recv.plan = remote, plan
        remote.inflight += 1
        notif = encode_notif("done", [spec.remote_request_id])
        start = time.perf_counter()
        try:
            if plan.merged:
                local_dlist = self._prep(LOCAL_AGENT, plan.local_items, self._local, recv)
                remote_dlist = self._prep(
                    remote.agent_name, plan.remote_items, remote.regions, recv
                )
                idx = list(range(len(plan.local_items)))
                recv.handle = self._t.make_prepped_xfer(
                    "READ", local_dlist, idx, remote_dlist, idx, notif
                )
            else:
                recv.handle = self._t.make_prepped_xfer(
                    "READ",
                    self._local_dlist,
                    plan.local_indices,
                    remote.dlist,
                    plan.remote_indices,
                    notif,
                )
            recv.posted_at, recv.posted_wall = now, time.perf_counter()
            state: XferState = self._t.transfer(recv.handle)
            self._stats.observe(keys.POST_TIME, time.perf_counter() - start)
        except TRANSPORT_ERRORS as e:
            self._stats.incr(keys.FAILED_TRANSFERS)
            self._fail(recv, f"posting the READ failed: {e}")
            return
        self._on_state(recv, state, now)

    def _prep(
        self, agent: str, items: list[tuple[int, int, int]], regions: KVRegions, recv: _Recv
    ) -> DlistHandle:
        handle = self._t.prep_xfer_dlist(agent, self._t.get_xfer_descs(items, memory_type(regions)))
        recv.dlists.append(handle)
        return handle

    def _check(self, recv: _Recv, handle: XferHandle, now: float) -> None:
        try:
            state = self._t.check_xfer_state(handle)
        except NixlTransportError as e:
            logger.warning("checking the READ of %s failed: %s", recv.spec.request_id, e)
            state = "ERR"
        self._on_state(recv, state, now)

    def _on_state(self, recv: _Recv, state: XferState, now: float) -> None:
        if state == "DONE":
            self._complete(recv)
        elif state == "ERR":
            if recv.remote is not None:
                recv.remote.stale = True
            self._stats.incr(keys.FAILED_TRANSFERS)
            self._fail(recv, f"READ from engine {recv.spec.remote_engine_id} ended in ERR")

    def _complete(self, recv: _Recv) -> None:
        seconds = time.perf_counter() - recv.posted_wall
        telemetry = None
        try:
            if recv.handle is not None:
                telemetry = self._t.get_xfer_telemetry(recv.handle)
        except NixlTransportError as e:
            logger.debug("no telemetry for %s: %s", recv.spec.request_id, e)
        if telemetry is not None and telemetry.xfer_duration_us > 0:
            seconds = telemetry.xfer_duration_us / 1e6
        plan = recv.plan
        if plan is None:
            raise RuntimeError(f"READ of {recv.spec.request_id} completed without a plan")
        self._stats.incr(keys.NUM_TRANSFERS)
        self._stats.incr(keys.NOTIFICATIONS_SENT)
        self._stats.observe(keys.XFER_TIME, seconds)
        self._stats.observe(keys.BYTES, plan.num_bytes)
        self._stats.observe(keys.NUM_DESCRIPTORS, plan.num_descs)
        if seconds > self._cfg.slow_transfer_s:
            logger.warning(
                "slow READ for %s: %d bytes in %d descriptors took %.3fs (%.2f GB/s); UCX_TLS=%s "
                "(run with UCX_PROTO_INFO=y to see the transports UCX picked; a VRAM path "
                "over tcp is the usual cause)",
                recv.spec.request_id,
                plan.num_bytes,
                plan.num_descs,
                seconds,
                plan.num_bytes / seconds / 1e9,
                os.environ.get("UCX_TLS", "(default)"),
            )
        self._end(recv)

    # -- endings --------------------------------------------------------------------------------
    def _fail(self, recv: _Recv, reason: str) -> None:
        spec = recv.spec
        if not recv.aborted:
            blocks = spec.all_local_block_ids
            logger.warning(
                "load of %s failed: %s; %d blocks marked as load errors",
                spec.request_id,
                reason,
                len(blocks),
            )
            self._invalid |= blocks
            self._failures[spec.request_id] = reason
        self.engines.notify(spec.remote_engine_id, "release", [spec.remote_request_id])
        self._end(recv)

    def _end(self, recv: _Recv) -> None:
        """Release what the load holds and report it (as aborted or as received)."""
        if recv.handle is not None:
            self._release_xfer(recv.handle)
            recv.handle = None
        for dlist in recv.dlists:
            try:
                self._t.release_dlist_handle(dlist)
            except NixlTransportError as e:
                logger.error("releasing a dlist of %s failed: %s", recv.spec.request_id, e)
        recv.dlists.clear()
        if recv.remote is not None:
            recv.remote.inflight -= 1
            recv.remote = None
        self._recvs.pop(recv.spec.request_id, None)
        if not recv.aborted or recv.report:
            self._recving.add(recv.spec.request_id)

    def _release_xfer(self, handle: XferHandle) -> None:
        try:
            self._t.release_xfer_handle(handle)
        except NixlTransportError as e:
            logger.error("releasing transfer %s failed (%s); will retry", handle, e)
            self._zombies.append(handle)

    def _retry_zombies(self) -> None:
        zombies, self._zombies = self._zombies, []
        for handle in zombies:
            self._release_xfer(handle)

    # -- outputs --------------------------------------------------------------------------------
    def take_recving(self) -> set[str]:
        out, self._recving = self._recving, set()
        return out

    def take_invalid_blocks(self) -> set[int]:
        out, self._invalid = self._invalid, set()
        return out

    def take_failures(self) -> dict[str, str]:
        out, self._failures = self._failures, {}
        return out

    @property
    def num_inflight(self) -> int:
        return len(self._recvs)

    def check_integrity(self) -> None:
        for remote in self.engines:
            users = sum(1 for r in self._recvs.values() if r.remote is remote)
            if users != remote.inflight:
                raise AssertionError(
                    f"KVReader: engine {remote.engine_id} counts {remote.inflight} READs, "
                    f"{users} hold it"
                )

    def close(self) -> None:
        """Release every handle, dlist and remote agent; idempotent."""
        for recv in list(self._recvs.values()):
            recv.aborted = True
            self._end(recv)
        self._retry_zombies()
        self.engines.close()
        self._recving.clear()
