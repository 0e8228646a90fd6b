"""NixlWorker: the worker half of prefill/decode disaggregation (SPEC §3).

Producer: registers the KV cache with NIXL, serves its agent metadata on the side channel and
holds finished requests' blocks under leases (``LeaseTable``) until the consumer's ``done``
notification or a lapse. Consumer: loads remote blocks with one READ per request
(``KVReader``). torch is never imported: tensors are only asked for their address and shape.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvbridge.config import ConfigError, TransferConfig
from kvbridge.connector.base import KVConnectorWorker, KVConnectorWorkerMetadata
from kvbridge.connector.stats import KVConnectorStats
from kvbridge.connector.types import FinishedTransfers, KVCacheLayout, KVCacheSpec
from kvbridge.nixl import stats as keys
from kvbridge.nixl.handshake import (
    HandshakeListener,
    Handshaker,
    NixlAgentMetadata,
    compat_hash,
    encode_envelope,
)
from kvbridge.nixl.leases import LeaseTable
from kvbridge.nixl.metadata import NixlConnectorMetadata, NixlWorkerMetadata, decode_notif
from kvbridge.nixl.reader import KVReader, ReaderConfig
from kvbridge.nixl.remotes import RemoteEngines
from kvbridge.nixl.settings import NixlSettings
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

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

TransportFactory = Callable[[str], NixlTransport]


def make_transport_factory(settings: NixlSettings) -> TransportFactory:
    """``nixl_wrapper``: "nixl" (real NIXL), "fake" (``FakeNixlWrapper``) or a callable."""
    wrapper = settings.nixl_wrapper
    if callable(wrapper):
        return wrapper
    if wrapper == "fake":
        from kvbridge.nixl.fake import FakeNixlWrapper

        return lambda name: FakeNixlWrapper(name)
    from kvbridge.nixl.wrapper import NixlWrapper

    return lambda name: NixlWrapper(name, backends=settings.backends)


@dataclass
class _Registered:
    """Everything that exists once the KV cache is registered."""

    transport: NixlTransport
    regions: KVRegions
    reg_descs: RegDescs
    local_dlist: DlistHandle
    agent_metadata: NixlAgentMetadata
    listener: HandshakeListener | None
    handshaker: Handshaker | None
    reader: KVReader | None


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
        if config.kv_buffer_device == "cpu":
            raise ConfigError(
                "kv_buffer_device: 'cpu' (host-staged NIXL transfers) is not supported yet; use "
                "'cuda' (NIXL reads the KV cache where it lives, GPU or CPU memory)"
            )
        if cache_spec.layout is not KVCacheLayout.BLOCKS_FIRST:
            raise ConfigError(
                f"kv_layout: NixlConnector needs 'blocks_first', got {cache_spec.layout.value!r}"
            )
        self._factory = transport_factory or make_transport_factory(self.settings)
        self._clock = clock
        self.rank = rank
        self.agent_name = f"{config.engine_id}-r{rank}-{uuid.uuid4().hex[:8]}"
        self.compat_hash = compat_hash(cache_spec)
        self.stats = KVConnectorStats()
        self.leases = LeaseTable()
        self.leaked: LiveCounts | None = None  # what the transport still held at shutdown
        self._reg: _Registered | None = None
        self._sched_finished: set[str] = set()
        self._announced = False
        self._closed = False

    @property
    def registered(self) -> _Registered:
        if self._reg is None:
            raise RuntimeError("NixlWorker: register_kv_caches() has not been called")
        return self._reg

    # -- start-up -------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self._reg is not None or self._closed:
            raise RuntimeError("NixlWorker: register_kv_caches() called twice or after shutdown")
        regions = self._regions_of(kv_caches)
        mem: MemoryType = "VRAM" if regions.memory_type == "VRAM" else "DRAM"
        transport = self._factory(self.agent_name)
        listener = handshaker = None
        try:
            reg_descs = transport.get_reg_descs(regions.region_items(), mem)
            transport.register_memory(reg_descs)
            local = transport.prep_xfer_dlist(
                LOCAL_AGENT, transport.get_xfer_descs(regions.block_items(), mem)
            )
            md = self._agent_metadata(transport, regions)
            s = self.settings
            if self.config.is_producer:
                port = s.side_channel_port + self.rank if s.side_channel_port else 0
                answer = encode_envelope(md, self.compat_hash)
                listener = HandshakeListener(s.side_channel_host, port, answer, self.compat_hash)
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
                cfg = ReaderConfig(
                    s.transfer_timeout_s,
                    s.heartbeat_interval_s,
                    s.merge_contiguous_blocks,
                    s.slow_transfer_s,
                )
                groups = [
                    [regions.layer_names.index(n) for n in g.layer_names]
                    for g in self.cache_spec.groups
                ]
                engines = RemoteEngines(transport, regions, handshaker, self.stats, self.rank)
                reader = KVReader(transport, regions, local, groups, engines, cfg, self.stats)
        except BaseException:
            for part in (listener, handshaker):
                if part is not None:
                    part.close()
            transport.close()
            raise
        self._reg = _Registered(
            transport, regions, reg_descs, local, md, listener, handshaker, reader
        )
        logger.info(
            "NIXL worker %s registered %d layers x %d blocks (%s)",
            self.agent_name,
            len(regions.layer_names),
            regions.num_blocks,
            regions.memory_type,
        )

    def _regions_of(self, kv_caches: dict[str, torch.Tensor]) -> KVRegions:
        spec = self.cache_spec
        names = list(dict.fromkeys(n for g in spec.groups for n in g.layer_names))
        missing = sorted(set(names) - set(kv_caches))
        extra = sorted(set(kv_caches) - set(names))
        if missing or extra:
            raise ConfigError(
                f"kv_caches: layers {missing or extra} "
                f"{'missing' if missing else 'not in the cache spec'}"
            )
        want = (spec.num_blocks, 2, spec.block_size, spec.num_kv_heads, spec.head_dim)
        tensors = [kv_caches[n] for n in names]
        for name, t in zip(names, tensors):
            if tuple(t.shape) != want or str(t.dtype).removeprefix("torch.") != spec.dtype:
                raise ConfigError(
                    f"kv_caches[{name!r}]: {tuple(t.shape)} {t.dtype}, the cache spec declares "
                    f"{want} {spec.dtype} (blocks_first)"
                )
            if not t.is_contiguous() or t.device != tensors[0].device:
                raise ConfigError(
                    f"kv_caches[{name!r}]: must be contiguous and on {tensors[0].device}"
                )
        device = tensors[0].device
        return KVRegions(
            layer_names=tuple(names),
            base_addrs=tuple(t.data_ptr() for t in tensors),
            block_len=spec.block_bytes_per_layer,
            block_stride=tensors[0].stride(0) * tensors[0].element_size(),
            num_blocks=spec.num_blocks,
            memory_type="VRAM" if device.type == "cuda" else "DRAM",
            device_id=device.index or 0,
        )

    def _agent_metadata(self, transport: NixlTransport, regions: KVRegions) -> NixlAgentMetadata:
        spec = self.cache_spec
        return NixlAgentMetadata(
            engine_id=self.config.engine_id,
            tp_rank=self.rank,
            agent_metadata=transport.get_agent_metadata(),
            layer_names=list(regions.layer_names),
            kv_base_addrs=list(regions.base_addrs),
            block_len=regions.block_len,
            block_stride=regions.block_stride,
            block_size=spec.block_size,
            layout=spec.layout.value,
            num_blocks=regions.num_blocks,
            dtype=spec.dtype,
            num_layers=spec.num_layers,
            memory_type=regions.memory_type,
            device_id=regions.device_id,
            kv_buffer_device=self.config.kv_buffer_device,
        )

    def get_handshake_metadata(self) -> NixlAgentMetadata | None:
        return None if self._reg is None else self._reg.agent_metadata

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
        for send in meta.reqs_to_send.values():
            self.leases.start(send, now)
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
            reader.release(rel)
        reader.poll(now)

    def get_finished(self, finished_req_ids: frozenset[str]) -> FinishedTransfers:
        if self._reg is None:
            return FinishedTransfers(frozenset(), frozenset())
        now = self._clock()
        reader = self._reg.reader
        recving: set[str] = set()
        if reader is not None:
            reader.poll(now)
            recving = reader.take_recving()
        if self._reg.listener is not None:
            self._drain_notifs(now)
        expired = self.leases.expire(now, early_ttl_s=self.settings.abort_timeout_s)
        if expired:
            self.stats.incr(keys.EXPIRED_REQS, len(expired))
        # Only ids the scheduler said finished (a SendSpec and its finish come in one step).
        allowed = self._sched_finished | finished_req_ids
        sending = self.leases.take_finished(allowed)
        self._sched_finished = {r for r in allowed - sending if self.leases.knows(r)}
        return FinishedTransfers(frozenset(sending), frozenset(recving))

    def _drain_notifs(self, now: float) -> None:
        try:
            notifs = self.registered.transport.get_new_notifs()
        except NixlTransportError as e:
            logger.warning("reading NIXL notifications failed: %s", e)
            return
        lease_s = self.settings.kv_lease_duration_s
        for agent, messages in notifs.items():
            for payload in messages:
                try:
                    notif = decode_notif(payload)
                except ValueError as e:
                    self.stats.incr(keys.FAILED_NOTIFICATIONS)
                    logger.warning("notification from %s dropped: %s", agent, e)
                    continue
                self.stats.incr(keys.NOTIFICATIONS_RECEIVED)
                for rid in notif.request_ids:
                    if notif.kind == "heartbeat":
                        self.leases.renew(rid, now, lease_s)
                    else:
                        self.leases.complete(rid, now)

    def get_block_ids_with_load_errors(self) -> set[int]:
        reader = None if self._reg is None else self._reg.reader
        return set() if reader is None else reader.take_invalid_blocks()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        if self._reg is None:
            return None
        failures = {} if self._reg.reader is None else self._reg.reader.take_failures()
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
    @property
    def num_inflight_loads(self) -> int:
        reader = None if self._reg is None else self._reg.reader
        return 0 if reader is None else reader.num_inflight

    def check_integrity(self) -> None:
        self.leases.check_integrity()
        if self._reg is not None and self._reg.reader is not None:
            self._reg.reader.check_integrity()

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
        held = self.leases.clear()
        if held:
            logger.info("shutdown drops %d leases: %s", len(held), sorted(held)[:8])
        t = reg.transport
        for release in (
            lambda: t.release_dlist_handle(reg.local_dlist),
            lambda: t.deregister_memory(reg.reg_descs),
        ):
            try:
                release()
            except NixlTransportError as e:
                logger.error("NIXL worker %s shutdown: %s", self.agent_name, e)
        self.leaked = t.close()
        if self.leaked != LiveCounts(0, 0, 0, 0):
            logger.error("NIXL worker %s leaked %s", self.agent_name, self.leaked)
