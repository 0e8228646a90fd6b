"""NixlWorker: the worker half of prefill/decode disaggregation (SPEC §3).

Producer: registers the KV cache with NIXL, serves its agent metadata and its leases' outcomes
on the side channel and holds finished requests' blocks under leases (``LeaseKeeper``) until
the consumer's ``done`` notification or a lapse, each live lease's word on its lease board
(``lease_board``). Consumer: loads remote blocks with one READ per request, confirmed against
the producer's lease by a board READ or the lease answer (``KVReader``).

``kv_buffer_device: "cpu"`` registers a host mirror of the cache instead (``HostStaging``):
held blocks are copied into it before their lease starts, loaded blocks land in it and are
copied into the cache before the load is reported. torch is never imported here.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

from kvbridge.config import ConfigError, TransferConfig
from kvbridge.connector.base import KVConnectorWorker, KVConnectorWorkerMetadata
from kvbridge.connector.gauges import GaugeValues
from kvbridge.connector.stats import KVConnectorStats
from kvbridge.connector.types import FinishedTransfers, KVCacheSpec
from kvbridge.nixl.board_reads import BoardReads
from kvbridge.nixl.handshake import (
    HandshakeListener,
    Handshaker,
    NixlAgentMetadata,
    compat_hash,
    encode_envelope,
)
from kvbridge.nixl.lease_board import LeaseBoard, register_board
from kvbridge.nixl.lease_confirm import LEASE_FRAME, LeaseConfirmer, lease_query_handler
from kvbridge.nixl.leases import MAX_PROMISE_S, LeaseTable
from kvbridge.nixl.load_state import ReaderConfig
from kvbridge.nixl.metadata import NixlConnectorMetadata, NixlWorkerMetadata
from kvbridge.nixl.producer import LeaseKeeper
from kvbridge.nixl.reader import KVReader
from kvbridge.nixl.registration import agent_metadata, cache_regions, check_kv_caches
from kvbridge.nixl.remotes import RemoteEngines
from kvbridge.nixl.settings import NixlSettings
from kvbridge.nixl.staging import HostStaging
from kvbridge.nixl.transfers import KVRegions
from kvbridge.nixl.transport import (
    LOCAL_AGENT,
    DlistHandle,
    LiveCounts,
    MemoryType,
    NixlTransport,
    NixlTransportError,
    RegDescs,
)
from kvbridge.nixl.transport_factory import (
    TransportFactory,
    add_counts,
    apply_ucx_defaults,
    make_notifier,
    make_transport_factory,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass
class _Registered:
    """Everything that exists once the KV cache is registered."""

    transport: NixlTransport
    regions: KVRegions  # what NIXL reads and writes: the cache, or its host mirror
    reg_descs: RegDescs
    local_dlist: DlistHandle
    agent_metadata: NixlAgentMetadata
    listener: HandshakeListener | None
    handshaker: Handshaker | None
    reader: KVReader | None
    staging: HostStaging | None
    board_regs: RegDescs | None = None  # the producer's lease board, registered


class NixlWorker(KVConnectorWorker):
    """Runs in a worker; owns the NIXL agent, the registered KV memory, loads and leases."""

    def __init__(
        self,
        config: TransferConfig,
        cache_spec: KVCacheSpec,
        *,
        transport_factory: TransportFactory | None = None,
        clock: Callable[[], float] = time.monotonic,
        rank: int = 0,
    ) -> None:
        super().__init__(config, cache_spec)
        self.settings = NixlSettings.from_config(config)
        if not cache_spec.layout.is_block_dense:
            raise ConfigError(
                f"kv_layout: NixlConnector needs one region per block and layer, got "
                f"{cache_spec.layout.value!r}"
            )
        self._factory = transport_factory or make_transport_factory(self.settings)
        self._clock = clock
        self.rank = rank
        self.agent_name = f"{config.engine_id}-r{rank}-{uuid.uuid4().hex[:8]}"
        self.compat_hash = compat_hash(cache_spec)
        self.stats = KVConnectorStats()
        self.leases = LeaseTable()
        self.producer = LeaseKeeper(
            self.leases,
            self.stats,
            lease_duration_s=self.settings.kv_lease_duration_s,
            abort_timeout_s=self.settings.abort_timeout_s,
        )
        self.leaked: LiveCounts | None = None  # what the transport still held at shutdown
        self._reg: _Registered | None = None
        self._announced = False
        self._closed = False

    @property
    def _reader(self) -> KVReader | None:
        """The consumer's reader (None before registration and on a producer)."""
        return None if self._reg is None else self._reg.reader

    @property
    def registered(self) -> _Registered:
        if self._reg is None:
            raise RuntimeError("NixlWorker: register_kv_caches() has not been called")
        return self._reg

    @property
    def host_staged(self) -> bool:
        return self.config.kv_buffer_device == "cpu"

    # -- start-up -------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self._reg is not None or self._closed:
            raise RuntimeError("NixlWorker: register_kv_caches() called twice or after shutdown")
        layers = check_kv_caches(self.cache_spec, kv_caches)
        staging = None
        regions = cache_regions(self.cache_spec, layers)
        if self.host_staged:
            staging = HostStaging(layers.tensors, layers.group_layers)
            regions = staging.regions(layers.names, regions.block_len)
        mem: MemoryType = "VRAM" if regions.memory_type == "VRAM" else "DRAM"
        apply_ucx_defaults(mem, self.settings.backends)
        transport = self._factory(self.agent_name)
        listener = handshaker = confirmer = boards = notifier = engines = None
        board, board_regs = self._lease_board(), None
        try:
            reg_descs = transport.get_reg_descs(regions.region_items(), mem)
            transport.register_memory(reg_descs)
            local = transport.prep_xfer_dlist(
                LOCAL_AGENT, transport.get_xfer_descs(regions.block_items(), mem)
            )
            if board is not None:
                board_regs = register_board(transport, board)
                self.leases.attach_board(board)
            md = agent_metadata(
                engine_id=self.config.engine_id,
                rank=self.rank,
                instance_id=self.agent_name,
                agent_bytes=transport.get_agent_metadata(),
                spec=self.cache_spec,
                regions=regions,
                kv_buffer_device=self.config.kv_buffer_device,
                lease_duration_s=self.settings.kv_lease_duration_s,
                lease_board=None if board is None else board.info(),
            )
            s = self.settings
            if self.config.is_producer:
                port = s.side_channel_port + self.rank if s.side_channel_port else 0
                answer = encode_envelope(md, self.compat_hash)
                leases = lease_query_handler(
                    self.config.engine_id,
                    self.agent_name,
                    lambda rid: self.leases.status(rid, self._clock()),
                )
                listener = HandshakeListener(
                    s.side_channel_host, port, answer, self.compat_hash, {LEASE_FRAME: leases}
                )
                self.producer.staging = staging
            reader = None
            if self.config.is_consumer:
                handshaker = Handshaker(
                    local_engine_id=self.config.engine_id,
                    hash_=self.compat_hash,
                    timeout_s=s.transfer_timeout_s,
                    max_bytes=s.max_handshake_bytes,
                    num_threads=s.num_threads,
                    enforce_compat=s.enforce_handshake_compat,
                )
                confirmer = LeaseConfirmer()
                boards = BoardReads(transport) if s.lease_board_slots else None
                if s.notify_agent:
                    notifier = make_notifier(self._factory, self.agent_name)
                cfg = ReaderConfig(
                    s.transfer_timeout_s, s.merge_contiguous_blocks, s.slow_transfer_s
                )
                engines = RemoteEngines(
                    transport,
                    regions,
                    handshaker,
                    self.stats,
                    self.rank,
                    watch_peers=True,
                    heartbeat_for=s.heartbeat_for,
                    read_boards=boards is not None,
                    notifier=notifier,
                )
                reader = KVReader(
                    transport,
                    regions,
                    local,
                    layers.group_layers,
                    engines,
                    cfg,
                    self.stats,
                    confirmer,
                    staging,
                    clock=self._clock,
                    boards=boards,
                )
        except BaseException:
            if engines is not None:  # its peer watch runs; it closes the notifier too
                engines.close()
                notifier = None
            for part in (listener, handshaker, confirmer, boards, notifier):
                if part is not None:
                    part.close()
            if staging is not None:
                staging.shutdown()
            transport.close()
            raise
        parts = (listener, handshaker, reader, staging, board_regs)
        self._reg = _Registered(transport, regions, reg_descs, local, md, *parts)
        logger.info(
            "NIXL worker %s registered %d layers x %d blocks (%s%s)",
            self.agent_name,
            len(regions.layer_names),
            regions.num_blocks,
            regions.memory_type,
            ", host-staged" if staging is not None else "",
        )

    def _lease_board(self) -> LeaseBoard | None:
        """A producer's lease board (``lease_board_slots`` words), None for none."""
        slots = self.settings.lease_board_slots
        return LeaseBoard(slots, self.agent_name) if self.config.is_producer and slots else None

    def get_handshake_metadata(self) -> NixlAgentMetadata | None:
        """This worker's agent and regions, with its side channel's address once it listens."""
        if self._reg is None:
            return None
        listener = self._reg.listener
        if listener is None:
            return self._reg.agent_metadata
        return msgspec.structs.replace(
            self._reg.agent_metadata,
            side_channel_host=listener.host,
            side_channel_port=listener.port,
        )

    @property
    def side_channel_port(self) -> int | None:
        listener = None if self._reg is None else self._reg.listener
        return None if listener is None else listener.port

    # -- every step -----------------------------------------------------------------------------
    def start_load_kv(self) -> None:
        meta = self.metadata
        if not isinstance(meta, NixlConnectorMetadata):
            raise TypeError(
                f"NixlWorker: expected NixlConnectorMetadata, got {type(meta).__name__}"
            )
        reg = self.registered
        now = self._clock()
        if meta.reqs_to_send:
            self.producer.start(list(meta.reqs_to_send.values()), now)
        reader = reg.reader
        if reader is None:
            if meta.reqs_to_recv or meta.reqs_aborted or meta.reqs_to_release:
                logger.error("loads planned for a worker whose kv_role is %s", self.config.kv_role)
            return
        for recv in meta.reqs_to_recv.values():
            reader.add(recv, now)
        for rid, report in meta.reqs_aborted.items():
            reader.abort(rid, report=report)
        for rel in meta.reqs_to_release:
            # Tell an attached producer it may free the blocks (else its lease lapses).
            reader.engines.notify(rel.remote_engine_id, "release", [rel.remote_request_id])
        reader.poll(now)

    def get_finished(self, finished_req_ids: frozenset[str]) -> FinishedTransfers:
        if self._reg is None:
            return FinishedTransfers(frozenset(), frozenset())
        now = self._clock()
        reader = self._reg.reader
        recving: set[str] = set()
        if reader is not None:
            reader.poll(now)
            recving = reader.results.take_recving()
        if self._reg.listener is not None:
            self.producer.drain_notifs(self._reg.transport, now)
        sending = self.producer.finished(finished_req_ids, now)
        return FinishedTransfers(frozenset(sending), frozenset(recving))

    def take_failed_recving(self) -> set[str]:
        reader = self._reader
        return set() if reader is None else reader.results.take_failed()

    def get_block_ids_with_load_errors(self) -> set[int]:
        reader = self._reader
        return set() if reader is None else reader.results.take_invalid_blocks()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        if self._reg is None:
            return None
        failures = {} if self._reg.reader is None else self._reg.reader.results.take_failures()
        listener = self._reg.listener
        announce = listener is not None and not self._announced and self.rank == 0
        if not failures and not announce:
            return None
        meta = NixlWorkerMetadata(load_failures=failures)
        if announce and listener is not None:
            self._announced = True
            meta.side_channel_host, meta.side_channel_port = listener.host, listener.port
        return meta

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        return self.stats.take()

    # -- introspection and shutdown -------------------------------------------------------------
    def get_kv_connector_gauges(self) -> GaugeValues:
        """Leases, loads and transport handles; a dlist counts unless it is the cache's own or
        the one of an attached producer in good standing (those stay while idle)."""
        reg = self._reg
        if reg is None:
            return {}
        t, reader = reg.transport, reg.reader
        standing = 1  # the cache's; a consumer's board READ buffer's and, per attached
        if reader is not None:  # producer not marked stale, its blocks' and its board's
            standing += reader.boards is not None
            standing += sum(1 + (e.board is not None) for e in reader.engines if not e.stale)
        return {
            "num_live_leases": self.leases.num_live,
            "nixl_num_inflight_xfer_handles": t.num_live_xfer_handles,
            "nixl_num_inflight_dlist_handles": max(0, t.num_live_dlist_handles - standing),
            "nixl_num_inflight_loads": self.num_inflight_loads,
            "nixl_num_remote_agents": t.num_remote_agents,
        }

    @property
    def num_inflight_loads(self) -> int:
        reader = self._reader
        return 0 if reader is None else reader.num_inflight

    def check_integrity(self) -> None:
        self.leases.check_integrity()
        if (reader := self._reader) is not None:
            reader.check_integrity()

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        reg, self._reg = self._reg, None
        if reg is None:
            return
        for part in (reg.listener, reg.handshaker):
            if part is not None:
                part.close()
        if reg.reader is not None:
            reg.reader.close()
        promise_s = self.leases.promised_until() - self._clock()  # no new answers: listener closed
        held = self.producer.close()
        if held:
            logger.info("shutdown drops %d leases: %s", len(held), sorted(held)[:8])
        if promise_s > 0:  # a consumer may be reading them, trusting an answer: keep our word
            logger.info("shutdown waits %.3fs for promised leases to run out", promise_s)
            time.sleep(min(promise_s, MAX_PROMISE_S))
        if reg.staging is not None:
            reg.staging.shutdown()
        t = reg.transport
        board_regs = reg.board_regs  # zeroed by ``producer.close`` above
        for release in (
            lambda: t.release_dlist_handle(reg.local_dlist),
            lambda: t.deregister_memory(reg.reg_descs),
            lambda: None if board_regs is None else t.deregister_memory(board_regs),
        ):
            try:
                release()
            except NixlTransportError as e:
                logger.error("NIXL worker %s shutdown: %s", self.agent_name, e)
        self.leaked = t.close()
        if reg.reader is not None:  # and its notification agent's
            self.leaked = add_counts(self.leaked, reg.reader.engines.notifier_leaked)
        if self.leaked != LiveCounts(0, 0, 0, 0):
            logger.error("NIXL worker %s leaked %s", self.agent_name, self.leaked)
