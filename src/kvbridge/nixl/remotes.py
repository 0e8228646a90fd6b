"""RemoteEngines: the producers a consumer worker has attached, and how it talks to them."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import NamedTuple

from kvbridge.connector.stats import KVConnectorStats
from kvbridge.nixl import stats as keys
from kvbridge.nixl.handshake import HandshakeError, Handshaker, NixlAgentMetadata
from kvbridge.nixl.lease_board import LeaseBoardInfo
from kvbridge.nixl.metadata import NotifKind, RecvSpec, encode_notif
from kvbridge.nixl.peer_watch import PeerWatch
from kvbridge.nixl.plan_cache import PlanCache
from kvbridge.nixl.settings import DEFAULT_HEARTBEAT_S
from kvbridge.nixl.transfers import KVRegions
from kvbridge.nixl.transport import (
    DlistHandle,
    LiveCounts,
    MemoryType,
    NixlTransport,
    NixlTransportError,
)

logger = logging.getLogger(__name__)

TRANSPORT_ERRORS = (NixlTransportError, ValueError, TypeError)


class RemoteBoard(NamedTuple):
    """An attached producer's lease board: where it is, and its per-bucket dlist."""

    info: LeaseBoardInfo
    dlist: DlistHandle


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
    gone: str | None = None  # why its side channel is gone (it exited): never notify it again
    heartbeat_s: float = DEFAULT_HEARTBEAT_S  # renew its leases this often
    board: RemoteBoard | None = None  # its lease board, when it has one and we read boards
    plans: PlanCache = field(default_factory=PlanCache, repr=False)  # its small READs' plans
    notifier: NixlTransport | None = field(default=None, repr=False)  # where it is notified

    @property
    def key(self) -> tuple[str, str]:
        return self.engine_id, self.instance_id


class Connecting(NamedTuple):
    """Where a load stands on its way to a usable remote engine: at most one field is set."""

    remote: RemoteEngine | None  # attached, usable, and bound to the load (``unbind`` it)
    future: Future[NixlAgentMetadata] | None  # handshake still running
    error: str | None  # handshake or attach failed


class RemoteEngines:
    """Runs in a consumer worker; owns the loaded producer agents and their prepared dlists.

    - A load binds its engine (``connect``) until its transfer handle is released (``unbind``);
      an engine is detached only when no load binds it, never under a transfer in flight.
    - A stale engine (a READ failed) is detached once idle and handshaken afresh.
    - With ``watch_peers`` (a ``PeerWatch``), an engine whose side channel drops the connection
      (the producer exited) is gone: detached at once if idle, even while the worker does
      nothing else (the watch's thread does it), else once idle; ``take_gone`` tells the
      reader to fail its loads.
    - Every method may run while the watch thread detaches: the table is locked.
    - With a ``notifier`` (``transport_factory.make_notifier``, owned from here on), each
      producer is loaded on it too and notified through it, never on its READs' endpoint.
    """

    def __init__(
        self,
        transport: NixlTransport,
        local: KVRegions,
        handshaker: Handshaker,
        stats: KVConnectorStats,
        tp_rank: int = 0,
        *,
        watch_peers: bool = False,
        heartbeat_for: Callable[[float], float] = lambda lease_s: DEFAULT_HEARTBEAT_S,
        read_boards: bool = False,
        notifier: NixlTransport | None = None,
    ) -> None:
        self._t = transport
        self._notifier = notifier
        self.notifier_leaked = LiveCounts(0, 0, 0, 0)  # what it still held when closed
        self._local = local
        self._handshaker = handshaker
        self._stats = stats
        self._tp_rank = tp_rank
        self._watch = PeerWatch(self.on_lost) if watch_peers else None
        self._heartbeat_for = heartbeat_for  # producer's lease -> heartbeat (ValueError: refuse)
        self._read_boards = read_boards  # prepare producers' lease boards for board READs
        self._lock = threading.RLock()
        self._engines: dict[str, RemoteEngine] = {}  # engine id -> attached producer
        self._gone: dict[tuple[str, str], str] = {}  # (engine id, instance id) -> why, unread
        self._closed = False

    @property
    def notifier(self) -> NixlTransport | None:
        """The notification agent (None: producers are notified through the READ agent)."""
        return self._notifier

    def get(self, engine_id: str) -> RemoteEngine | None:
        with self._lock:
            return self._engines.get(engine_id)

    def fetch(self, engine_id: str, host: str, port: int) -> Future[NixlAgentMetadata]:
        """Start (or join) the background handshake; worker rank r talks to the producer's r."""
        host, port = self.endpoint(host, port)
        return self._handshaker.fetch(engine_id, host, port, self._tp_rank)

    def connect(self, spec: RecvSpec, future: Future[NixlAgentMetadata] | None) -> Connecting:
        """Advance a load towards its producer: handshake in the background, then attach."""
        with self._lock:
            connecting = self._connect(spec, future)
            if connecting.remote is not None:
                connecting.remote.inflight += 1
            return connecting

    def unbind(self, remote: RemoteEngine) -> None:
        """A load no longer uses ``remote`` (no transfer of it is in flight)."""
        with self._lock:
            remote.inflight -= 1
            if remote.gone is not None and remote.inflight == 0:
                self._detach_stale(remote)

    def _connect(self, spec: RecvSpec, future: Future[NixlAgentMetadata] | None) -> Connecting:
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
        md = future.result()
        try:
            beat = self._heartbeat_for(md.kv_lease_duration_s)
        except ValueError as e:
            self._stats.incr(keys.FAILED_HANDSHAKES)
            return Connecting(None, None, f"engine {spec.remote_engine_id} refused: {e}")
        try:
            endpoint = self.endpoint(spec.remote_host, spec.remote_port)
            return Connecting(self.attach(md, endpoint, beat), None, None)
        except TRANSPORT_ERRORS as e:
            self._stats.incr(keys.FAILED_HANDSHAKES)
            return Connecting(None, None, f"cannot attach engine {spec.remote_engine_id}: {e}")

    def endpoint(self, host: str, port: int) -> tuple[str, int]:
        """The side channel of this worker's rank of a producer whose rank 0 is at host:port."""
        return host, port + self._tp_rank

    def attach(
        self,
        md: NixlAgentMetadata,
        endpoint: tuple[str, int] | None = None,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
    ) -> RemoteEngine:
        """Load the producer's agent and prepare its per-block dlist, and watch its side channel
        at ``endpoint`` (if given); raises TRANSPORT_ERRORS."""
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
        with self._lock:
            if self._closed:
                raise NixlTransportError("attach: the consumer is shutting down", "CLOSED")
            agent = self._t.add_remote_agent(md.agent_metadata)
            try:
                descs = self._t.get_xfer_descs(regions.block_items(), memory_type(regions))
                dlist = self._t.prep_xfer_dlist(agent, descs)
            except TRANSPORT_ERRORS:
                self._t.remove_remote_agent(agent)
                raise
            board = self._attach_board(md, agent) if self._read_boards else None
            engine = RemoteEngine(
                md.engine_id,
                agent,
                regions,
                dlist,
                instance_id=md.instance_id,
                staged=md.kv_buffer_device == "cpu",
                heartbeat_s=heartbeat_s,
                board=board,
            )
            engine.notifier = self._attach_notifier(md.engine_id, md.agent_metadata, agent)
            self._engines[md.engine_id] = engine
            if self._watch is not None and endpoint is not None:
                self._watch.watch(engine.key, *endpoint)
        logger.info(
            "attached engine %s (agent %s, %d blocks, heartbeat every %.3gs)",
            md.engine_id,
            agent,
            md.num_blocks,
            heartbeat_s,
        )
        return engine

    def _attach_board(self, md: NixlAgentMetadata, agent: str) -> RemoteBoard | None:
        """Prepare the producer's lease board for board READs; None (its loads just ask) when
        it has none or it cannot be used."""
        info = md.lease_board
        if info is None:
            return None
        problem = info.problem()
        if problem is None:
            try:
                dlist = self._t.prep_xfer_dlist(agent, self._t.get_xfer_descs(info.items(), "DRAM"))
            except TRANSPORT_ERRORS as e:
                problem = f"preparing it failed: {e}"
            else:
                return RemoteBoard(info, dlist)
        logger.warning("engine %s: lease board not used (%s)", md.engine_id, problem)
        return None

    def _attach_notifier(self, engine_id: str, metadata: bytes, agent: str) -> NixlTransport | None:
        """Load the producer on the notification agent; None (notify it through the READ
        agent) without one, or when that fails."""
        notifier = self._notifier
        if notifier is None:
            return None
        try:
            name = notifier.add_remote_agent(metadata)
        except TRANSPORT_ERRORS as e:
            logger.warning("engine %s: notified through the READ agent (%s)", engine_id, e)
            return None
        if name != agent:  # cannot be: the same metadata names the same agent
            logger.warning(
                "engine %s is %r to the notification agent, not %r", engine_id, name, agent
            )
            try:
                notifier.remove_remote_agent(name)
            except TRANSPORT_ERRORS as e:  # never fail the attach over the notification agent
                logger.warning("engine %s: could not unload %r (%s)", engine_id, name, e)
            return None
        return notifier

    def notify(
        self, engine_id: str, kind: NotifKind, request_ids: list[str], reader: str = ""
    ) -> bool:
        """Send a notification to an attached producer; False if not attached, gone or failed."""
        with self._lock:
            engine = self._engines.get(engine_id)
            if engine is None or engine.gone is not None:
                return False
            try:
                via = engine.notifier or self._t
                via.send_notif(engine.agent_name, encode_notif(kind, request_ids, reader))
            except NixlTransportError as e:
                error: NixlTransportError | None = e
            else:
                error = None
        if error is not None:
            self._stats.incr(keys.FAILED_NOTIFICATIONS)
            logger.warning(
                "notifying engine %s (%s %s) failed: %s", engine_id, kind, request_ids, error
            )
            return False
        self._stats.incr(keys.NOTIFICATIONS_SENT)
        return True

    def heartbeat(self, now: float, waiting: list[tuple[str, str]]) -> None:
        """Renew the producers' leases on ``waiting`` ((engine id, its request id) pairs), each
        at its own interval; a stale producer's too (one failed READ says nothing of the others
        still reading from it), not a gone one's (``notify`` skips it)."""
        by_engine: dict[str, list[str]] = {}  # engine id -> its request ids
        for engine_id, rid in waiting:
            by_engine.setdefault(engine_id, []).append(rid)
        for engine_id, ids in by_engine.items():
            engine = self.get(engine_id)
            if engine is None or now - engine.last_heartbeat < engine.heartbeat_s:
                continue
            engine.last_heartbeat = now
            self.notify(engine_id, "heartbeat", ids)

    def mark_stale(self, engine_id: str, instance_id: str) -> None:
        """The instance's agent is gone: detach it once idle, handshake afresh."""
        with self._lock:
            engine = self._engines.get(engine_id)
            if engine is not None and engine.instance_id == instance_id:
                engine.stale = True

    def detach_idle_stale(self) -> list[str]:
        """Detach stale engines nobody reads from; returns their ids (to be handshaken afresh)."""
        with self._lock:
            idle = [e for e in self._engines.values() if e.stale and e.inflight == 0]
            for engine in idle:
                self._detach_stale(engine)
        return [e.engine_id for e in idle]

    def take_gone(self) -> dict[tuple[str, str], str]:
        """Producer instances found gone since the last call: (engine id, instance id) -> why."""
        with self._lock:
            out, self._gone = self._gone, {}
            return out

    def on_lost(self, key: Hashable, reason: str) -> None:
        """``PeerWatch``'s callback (its thread): the side channel of ``key``'s instance is gone."""
        with self._lock:
            engine = None if not isinstance(key, tuple) else self._engines.get(key[0])
            if self._closed or engine is None or engine.key != key:
                return  # detached already, or another instance attached since
            engine.stale, engine.gone = True, reason
            self._gone[engine.key] = reason
            busy = engine.inflight
            if not busy:
                self._detach_stale(engine)
        logger.warning(
            "engine %s (%s) is gone: %s; %s",
            key[0],
            key[1],
            reason,
            f"detaching it once {busy} loads end" if busy else "detached it",
        )

    def _detach_stale(self, engine: RemoteEngine) -> None:
        self._detach(engine)
        self._handshaker.invalidate(engine.engine_id)

    def _detach(self, engine: RemoteEngine) -> None:
        """Release the engine's dlist and agent (the table's lock is held)."""
        del self._engines[engine.engine_id]
        if self._watch is not None:
            self._watch.unwatch(engine.key)
        for dlist in (engine.dlist, *(() if engine.board is None else (engine.board.dlist,))):
            try:
                self._t.release_dlist_handle(dlist)
            except NixlTransportError as e:
                logger.error("releasing a dlist of engine %s failed: %s", engine.engine_id, e)
        for transport in (self._t, *(() if engine.notifier is None else (engine.notifier,))):
            try:
                transport.remove_remote_agent(engine.agent_name)
            except NixlTransportError as e:
                logger.error("removing agent %s failed: %s", engine.agent_name, e)

    def __len__(self) -> int:
        with self._lock:
            return len(self._engines)

    def __iter__(self) -> Iterator[RemoteEngine]:
        with self._lock:
            return iter(list(self._engines.values()))

    def close(self) -> None:
        """Stop watching, then detach every engine; idempotent."""
        if self._watch is not None:
            self._watch.close()  # first: its thread may be waiting for the lock
        with self._lock:
            self._closed = True
            for engine in list(self._engines.values()):
                self._detach(engine)
            notifier, self._notifier = self._notifier, None
            if notifier is not None:
                self.notifier_leaked = notifier.close()


def memory_type(regions: KVRegions) -> MemoryType:
    if regions.memory_type not in ("DRAM", "VRAM"):
        raise ValueError(f"unknown memory type {regions.memory_type!r}")
    return "VRAM" if regions.memory_type == "VRAM" else "DRAM"
