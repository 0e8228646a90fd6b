"""RemoteEngines: the producers a consumer worker has attached, and how it talks to them."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import NamedTuple

from kvbridge.connector.stats import KVConnectorStats
from kvbridge.nixl import stats as keys
from kvbridge.nixl.handshake import HandshakeError, Handshaker, NixlAgentMetadata
from kvbridge.nixl.metadata import NotifKind, RecvSpec, encode_notif
from kvbridge.nixl.transfers import KVRegions
from kvbridge.nixl.transport import (
    DlistHandle,
    MemoryType,
    NixlTransport,
    NixlTransportError,
)

logger = logging.getLogger(__name__)

TRANSPORT_ERRORS = (NixlTransportError, ValueError, TypeError)


@dataclass
class RemoteEngine:
    """One attached producer: its NIXL agent and its blocks' per-block dlist (prepared once)."""

    engine_id: str
    agent_name: str
    regions: KVRegions
    dlist: DlistHandle
    inflight: int = 0  # READs posted against it and not yet ended
    last_heartbeat: float = -math.inf
    stale: bool = False  # a READ failed: detach once idle, handshake again
    instance_id: str = ""  # the producer worker instance (its agent name)
    staged: bool = False  # it serves a host buffer: ask for its lease before reading


class Connecting(NamedTuple):
    """Where a load stands on its way to a usable remote engine: at most one field is set."""

    remote: RemoteEngine | None  # attached and usable now
    future: Future[NixlAgentMetadata] | None  # handshake still running
    error: str | None  # handshake or attach failed


class RemoteEngines:
    """Runs in a consumer worker; owns the loaded producer agents and their prepared dlists."""

    def __init__(
        self,
        transport: NixlTransport,
        local: KVRegions,
        handshaker: Handshaker,
        stats: KVConnectorStats,
        tp_rank: int = 0,
    ) -> None:
        self._t = transport
        self._local = local
        self._handshaker = handshaker
        self._stats = stats
        self._tp_rank = tp_rank
        self._engines: dict[str, RemoteEngine] = {}  # engine id -> attached producer

    def get(self, engine_id: str) -> RemoteEngine | None:
        return self._engines.get(engine_id)

    def fetch(self, engine_id: str, host: str, port: int) -> Future[NixlAgentMetadata]:
        """Start (or join) the background handshake; worker rank r talks to the producer's r."""
        host, port = self.endpoint(host, port)
        return self._handshaker.fetch(engine_id, host, port, self._tp_rank)

    def connect(self, spec: RecvSpec, future: Future[NixlAgentMetadata] | None) -> Connecting:
        """Advance a load towards its producer: handshake in the background, then attach."""
        remote = self._engines.get(spec.remote_engine_id)
        if remote is not None:  # a stale one is detached once idle, then handshaken afresh
            return Connecting(None if remote.stale else remote, None, None)
        if future is None:
            future = self.fetch(spec.remote_engine_id, spec.remote_host, spec.remote_port)
        if not future.done():
            return Connecting(None, future, None)
        error = HandshakeError("handshake cancelled") if future.cancelled() else future.exception()
        if error is not None:
            self._stats.incr(keys.FAILED_HANDSHAKES)
            where = f"{spec.remote_host}:{spec.remote_port}"
            return Connecting(
                None,
                None,
                f"handshake with engine {spec.remote_engine_id} at {where} failed: {error}",
            )
        try:
            return Connecting(self.attach(future.result()), None, None)
        except TRANSPORT_ERRORS as e:
            self._stats.incr(keys.FAILED_HANDSHAKES)
            return Connecting(None, None, f"cannot attach engine {spec.remote_engine_id}: {e}")

    def endpoint(self, host: str, port: int) -> tuple[str, int]:
        """The side channel of this worker's rank of a producer whose rank 0 is at host:port."""
        return host, port + self._tp_rank

    def attach(self, md: NixlAgentMetadata) -> RemoteEngine:
        """Load the producer's agent and prepare its per-block dlist; raises TRANSPORT_ERRORS."""
        regions = KVRegions(
            layer_names=tuple(md.layer_names),
            base_addrs=tuple(md.kv_base_addrs),
            block_len=md.block_len,
            block_stride=md.block_stride,
            num_blocks=md.num_blocks,
            memory_type=md.memory_type,
            device_id=md.device_id,
        )
        if regions.layer_names != self._local.layer_names:
            raise ValueError("producer registered other layers than this engine")
        if regions.block_len != self._local.block_len:
            raise ValueError(
                f"producer blocks are {regions.block_len} bytes per layer, ours "
                f"{self._local.block_len}"
            )
        agent = self._t.add_remote_agent(md.agent_metadata)
        try:
            descs = self._t.get_xfer_descs(regions.block_items(), memory_type(regions))
            dlist = self._t.prep_xfer_dlist(agent, descs)
        except TRANSPORT_ERRORS:
            self._t.remove_remote_agent(agent)
            raise
        engine = RemoteEngine(
            md.engine_id,
            agent,
            regions,
            dlist,
            instance_id=md.instance_id,
            staged=md.kv_buffer_device == "cpu",
        )
        self._engines[md.engine_id] = engine
        logger.info("attached engine %s (agent %s, %d blocks)", md.engine_id, agent, md.num_blocks)
        return engine

    def notify(self, engine_id: str, kind: NotifKind, request_ids: list[str]) -> bool:
        """Send a notification to an attached producer; False if not attached or it failed."""
        engine = self._engines.get(engine_id)
        if engine is None:
            return False
        try:
            self._t.send_notif(engine.agent_name, encode_notif(kind, request_ids))
        except NixlTransportError as e:
            self._stats.incr(keys.FAILED_NOTIFICATIONS)
            logger.warning(
                "notifying engine %s (%s %s) failed: %s", engine_id, kind, request_ids, e
            )
            return False
        self._stats.incr(keys.NOTIFICATIONS_SENT)
        return True

    def heartbeat(self, now: float, waiting: dict[str, list[str]], interval_s: float) -> None:
        """Renew the producers' leases on ``waiting`` (engine id -> their request ids)."""
        for engine_id, ids in waiting.items():
            engine = self._engines.get(engine_id)
            if engine is None or engine.stale or now - engine.last_heartbeat < interval_s:
                continue
            engine.last_heartbeat = now
            self.notify(engine_id, "heartbeat", ids)

    def detach_idle_stale(self) -> list[str]:
        """Detach stale engines nobody reads from; returns their ids (to be handshaken afresh)."""
        gone = [e for e in self._engines.values() if e.stale and e.inflight == 0]
        for engine in gone:
            self._detach(engine)
            self._handshaker.invalidate(engine.engine_id)
        return [e.engine_id for e in gone]

    def _detach(self, engine: RemoteEngine) -> None:
        del self._engines[engine.engine_id]
        try:
            self._t.release_dlist_handle(engine.dlist)
        except NixlTransportError as e:
            logger.error("releasing the dlist of engine %s failed: %s", engine.engine_id, e)
        try:
            self._t.remove_remote_agent(engine.agent_name)
        except NixlTransportError as e:
            logger.error("removing agent %s failed: %s", engine.agent_name, e)

    def __len__(self) -> int:
        return len(self._engines)

    def __iter__(self) -> Iterator[RemoteEngine]:
        return iter(list(self._engines.values()))

    def close(self) -> None:
        for engine in list(self._engines.values()):
            self._detach(engine)


def memory_type(regions: KVRegions) -> MemoryType:
    if regions.memory_type not in ("DRAM", "VRAM"):
        raise ValueError(f"unknown memory type {regions.memory_type!r}")
    return "VRAM" if regions.memory_type == "VRAM" else "DRAM"
