"""Side channel for NIXL agent metadata: typed payloads, a listener, and a background client.

Wire (msgpack, no pickle)::

    consumer REQ  --HandshakeRequest(version, compat_hash, engine_id, tp_rank)-->  producer ROUTER
    consumer REQ  <--HandshakeEnvelope(version, compat_hash, payload, error)---   producer ROUTER

A two-frame request ``[kind, payload]`` goes to the listener's handler for ``kind`` instead
(``lease_confirm`` registers ``b"lease"``).

The consumer decodes in two phases: the envelope first; only if its version and compatibility
hash match its own does it decode ``payload`` as ``NixlAgentMetadata``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor

import msgspec
import zmq

from kvbridge.connector.base import KVConnectorHandshakeMetadata
from kvbridge.connector.types import KVCacheSpec
from kvbridge.nixl.lease_board import LeaseBoardInfo
from kvbridge.nixl.zmq_links import MONITOR_EVENTS, LinkState, tcp_endpoint

logger = logging.getLogger(__name__)

HANDSHAKE_VERSION = 1
CONNECTOR_VERSION = "kvbridge-nixl/3"  # 2: lease confirmation, host staging; 3: held-for
MAX_REQUEST_BYTES = 64 << 10
# Messages over this multiple of a limit are dropped by zmq itself (memory bound, no log line).
_HARD_CAP_FACTOR = 8
_POLL_MS = 50


class HandshakeError(RuntimeError):
    """A handshake failed; ``retriable`` is False for answers that a retry cannot change."""

    def __init__(self, message: str, *, retriable: bool = False) -> None:
        super().__init__(message)
        self.retriable = retriable


class NixlAgentMetadata(KVConnectorHandshakeMetadata, kw_only=True):
    """What a producer worker publishes: its NIXL agent and where its KV blocks live."""

    engine_id: str
    tp_rank: int
    agent_metadata: bytes
    layer_names: list[str]
    kv_base_addrs: list[int]  # per layer, in layer_names order
    block_len: int  # bytes of one block of one layer
    block_stride: int  # bytes between consecutive blocks of one layer
    block_size: int
    layout: str
    num_blocks: int
    dtype: str
    num_layers: int
    memory_type: str  # "DRAM" | "VRAM"
    device_id: int
    kv_buffer_device: str  # "cpu": the addresses are a host buffer the producer stages into
    instance_id: str = ""  # the producer worker's agent name; changes when it restarts
    # Where the producer's side channel listens (told to its own scheduler half at start-up).
    side_channel_host: str = ""
    side_channel_port: int = 0
    # How long the producer holds blocks without a heartbeat (0: not announced, an older one);
    # a consumer derives its heartbeat interval from it, or checks its configured one against it.
    kv_lease_duration_s: float = 0.0
    # Where the producer's lease board is (None: it has none, an older one or turned off).
    lease_board: LeaseBoardInfo | None = None


class HandshakeRequest(msgspec.Struct, kw_only=True):
    """Consumer -> producer: who asks, with which protocol version and compat hash."""

    version: int
    compat_hash: str
    engine_id: str
    tp_rank: int = 0


class HandshakeEnvelope(msgspec.Struct, kw_only=True):
    """Producer's answer, decoded first: version and hash, then the payload or an error."""

    version: int
    compat_hash: str
    payload: bytes = b""
    error: str | None = None


def compat_hash(spec: KVCacheSpec) -> str:
    """sha256 over what two engines must share to exchange KV blocks byte for byte."""
    fields = {
        "connector": CONNECTOR_VERSION,
        "num_layers": spec.num_layers,
        "num_kv_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "dtype": spec.dtype,
        "block_size": spec.block_size,
        "layout": spec.layout.value,
        "groups": [list(g.layer_names) for g in spec.groups],
        "world_size": spec.world_size,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def encode_envelope(metadata: NixlAgentMetadata, hash_: str) -> bytes:
    payload = msgspec.msgpack.encode(metadata)
    return msgspec.msgpack.encode(
        HandshakeEnvelope(version=HANDSHAKE_VERSION, compat_hash=hash_, payload=payload)
    )


def decode_envelope(
    data: bytes, *, expected_hash: str, max_bytes: int, enforce_compat: bool = True
) -> NixlAgentMetadata:
    """Two-phase decode of a producer's answer; raises ``HandshakeError`` (not retriable)."""
    if len(data) > max_bytes:
        raise HandshakeError(f"handshake answer of {len(data)} bytes exceeds {max_bytes}")
    try:
        envelope = msgspec.msgpack.decode(data, type=HandshakeEnvelope)
    except (msgspec.DecodeError, UnicodeDecodeError) as e:  # msgspec lets bad UTF-8 through
        raise HandshakeError(f"malformed handshake envelope: {e}") from None
    if envelope.error is not None:
        raise HandshakeError(f"producer refused the handshake: {envelope.error}")
    if envelope.version != HANDSHAKE_VERSION:
        raise HandshakeError(
            f"handshake version {envelope.version} from the producer, expected {HANDSHAKE_VERSION}"
        )
    if envelope.compat_hash != expected_hash:
        message = (
            f"compatibility hash mismatch (producer {envelope.compat_hash[:12]}, consumer "
            f"{expected_hash[:12]}): model shape, dtype, block size or layout differ"
        )
        if enforce_compat:
            raise HandshakeError(message)
        logger.warning("%s; proceeding because enforce_handshake_compat is off", message)
    try:
        return msgspec.msgpack.decode(envelope.payload, type=NixlAgentMetadata)
    except (msgspec.DecodeError, UnicodeDecodeError) as e:  # msgspec lets bad UTF-8 through
        raise HandshakeError(f"malformed agent metadata: {e}") from None


class HandshakeListener:
    """Runs in a producer worker; owns the side-channel socket and serves its agent metadata."""

    def __init__(
        self,
        host: str,
        port: int,
        answer: bytes,
        hash_: str,
        handlers: Mapping[bytes, Callable[[bytes], bytes]] | None = None,
    ) -> None:
        self._metadata_answer = answer
        self._handlers = dict(handlers or {})
        self._hash = hash_
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        # zmq drops (silently) only what is far over the limit, bounding memory; anything over
        # the limit itself is refused below with a log line and an error answer.
        self._sock.setsockopt(zmq.MAXMSGSIZE, _HARD_CAP_FACTOR * MAX_REQUEST_BYTES)
        if ":" in host:
            self._sock.setsockopt(zmq.IPV6, 1)
        try:
            self._sock.bind(tcp_endpoint(host, port or "*"))  # "*": any free port
            endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError as e:
            self._sock.close()
            self._ctx.term()
            raise OSError(f"side channel: cannot bind {host}:{port}: {e}") from e
        self.port = int(endpoint.rsplit(":", 1)[1])
        self.host = host
        self.num_served = 0
        self.num_malformed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="kvbridge-nixl-side", daemon=True)
        self._thread.start()
        picked = " (a free port: side_channel_port 0)" if not port else ""
        logger.info("NIXL side channel listening on %s:%d%s", host, self.port, picked)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                if not self._sock.poll(_POLL_MS):
                    continue
                identity, *rest = self._sock.recv_multipart()
                prefix = [b""] if rest[:1] == [b""] else []  # REQ peers add a delimiter
                size = sum(len(frame) for frame in rest)
                try:
                    if size > MAX_REQUEST_BYTES:
                        logger.warning(
                            "side channel: request of %d bytes is too large (limit %d); refused",
                            size,
                            MAX_REQUEST_BYTES,
                        )
                        answer = self._error(f"request too large: {size} > {MAX_REQUEST_BYTES}")
                    else:
                        answer = self._answer(rest[len(prefix) :])
                except Exception as e:  # one bad request must never stop the listener
                    logger.exception("side channel: failed to answer a request")
                    answer = self._error(f"internal error: {type(e).__name__}")
                self._sock.send_multipart([identity, *prefix, answer])
            except zmq.ZMQError as e:
                if self._stop.is_set():
                    break
                logger.warning("side channel: socket error %s; still serving", e)
        self._sock.close()

    def _answer(self, body: list[bytes]) -> bytes:
        if len(body) == 2 and body[0] in self._handlers:
            return self._handlers[body[0]](body[1])
        if len(body) != 1:
            return self._error(f"expected one frame, got {len(body)}")
        try:
            request = msgspec.msgpack.decode(body[0], type=HandshakeRequest)
        except (msgspec.DecodeError, UnicodeDecodeError) as e:  # msgspec lets bad UTF-8 through
            return self._error(f"malformed handshake request: {e}")
        if request.version != HANDSHAKE_VERSION or request.compat_hash != self._hash:
            logger.info(
                "side channel: engine %s asks with version %d / hash %s (ours %d / %s)",
                request.engine_id,
                request.version,
                request.compat_hash[:12],
                HANDSHAKE_VERSION,
                self._hash[:12],
            )
        self.num_served += 1
        return self._metadata_answer

    def _error(self, message: str) -> bytes:
        self.num_malformed += 1
        logger.warning("side channel on port %d: %s", self.port, message)
        return msgspec.msgpack.encode(
            HandshakeEnvelope(version=HANDSHAKE_VERSION, compat_hash=self._hash, error=message)
        )

    def close(self) -> None:
        """Stop serving and release the port; idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=5)
        self._ctx.term()


class Handshaker:
    """Runs in a consumer worker; fetches producers' metadata in background threads, cached.

    ``fetch`` never blocks and never raises: the returned future holds the metadata or a
    ``HandshakeError``. A side channel that refuses or drops the connection fails the fetch at
    once (the producer is gone); no answer is retried (with backoff) until ``timeout_s``. The
    next ``fetch`` after a failure starts afresh (the producer may have restarted).
    """

    def __init__(
        self,
        *,
        local_engine_id: str,
        hash_: str,
        timeout_s: float,
        max_bytes: int,
        num_threads: int = 2,
        enforce_compat: bool = True,
    ) -> None:
        self._engine_id = local_engine_id
        self._hash = hash_
        self._timeout_s = timeout_s
        self._max_bytes = max_bytes
        self._enforce = enforce_compat
        self._ctx = zmq.Context()
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="kvbridge-handshake")
        self._stop = threading.Event()
        self._lock = threading.Lock()  # ``invalidate`` may come from another thread
        # (engine_id, host, port, tp_rank) -> fetch in flight or done
        self._cache: dict[tuple[str, str, int, int], Future[NixlAgentMetadata]] = {}

    def fetch(
        self, engine_id: str, host: str, port: int, tp_rank: int = 0
    ) -> Future[NixlAgentMetadata]:
        key = (engine_id, host, port, tp_rank)
        with self._lock:
            future = self._cache.get(key)
            if future is not None and not (future.done() and future.exception() is not None):
                return future
            if self._stop.is_set():
                future = Future()
                future.set_exception(HandshakeError("handshake client is shut down"))
                return future
            future = self._pool.submit(self._run, key)
            self._cache[key] = future
            return future

    def invalidate(self, engine_id: str) -> None:
        """Forget cached answers of ``engine_id`` (after a transfer error, say); any thread."""
        with self._lock:
            for key in [k for k in self._cache if k[0] == engine_id]:
                del self._cache[key]

    def _run(self, key: tuple[str, str, int, int]) -> NixlAgentMetadata:
        engine_id, host, port, tp_rank = key
        deadline = time.monotonic() + self._timeout_s
        delay = 0.05
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stop.is_set():
                raise HandshakeError(
                    f"no handshake answer from {host}:{port} within {self._timeout_s:g}s",
                    retriable=True,
                )
            try:
                metadata = self._attempt(host, port, tp_rank, min(remaining, 2.0))
            except HandshakeError as e:
                if not e.retriable:
                    raise
            else:
                if metadata.engine_id != engine_id:
                    raise HandshakeError(
                        f"{host}:{port} serves engine {metadata.engine_id!r}, "
                        f"expected {engine_id!r}"
                    )
                return metadata
            self._stop.wait(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 1.0)

    def _attempt(self, host: str, port: int, tp_rank: int, timeout_s: float) -> NixlAgentMetadata:
        sock = self._ctx.socket(zmq.REQ)
        monitor = sock.get_monitor_socket(MONITOR_EVENTS)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            # Over the limit but under the hard cap: received, then refused by decode_envelope
            # with a message that names the size.
            sock.setsockopt(zmq.MAXMSGSIZE, _HARD_CAP_FACTOR * self._max_bytes)
            if ":" in host:
                sock.setsockopt(zmq.IPV6, 1)
            sock.connect(tcp_endpoint(host, port))
            request = HandshakeRequest(
                version=HANDSHAKE_VERSION,
                compat_hash=self._hash,
                engine_id=self._engine_id,
                tp_rank=tp_rank,
            )
            sock.send(msgspec.msgpack.encode(request))
            answer = self._await_answer(sock, monitor, LinkState(host, port), timeout_s)
        finally:
            sock.disable_monitor()
            monitor.close()
            sock.close()
        return decode_envelope(
            answer,
            expected_hash=self._hash,
            max_bytes=self._max_bytes,
            enforce_compat=self._enforce,
        )

    def _await_answer(
        self, sock: zmq.Socket[bytes], monitor: zmq.Socket[bytes], link: LinkState, timeout_s: float
    ) -> bytes:
        """The answer; ``HandshakeError`` at once if the side channel refuses or drops us (the
        producer is gone: a retry cannot help), retriable after ``timeout_s`` of silence."""
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        end = time.monotonic() + timeout_s
        while True:
            ready = dict(poller.poll(_POLL_MS))
            if sock in ready:
                return sock.recv()
            gone = link.drain(monitor) if monitor in ready else None
            if gone is not None:
                raise HandshakeError(f"{gone}: the producer is gone")
            if self._stop.is_set() or time.monotonic() >= end:
                raise HandshakeError(f"{link.where} did not answer", retriable=True)

    def close(self) -> None:
        """Cancel pending fetches and join the threads; idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._cache.clear()
        self._ctx.term()
