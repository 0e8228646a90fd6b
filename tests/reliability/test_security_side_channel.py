"""The NIXL side channel under bad clients, over real zmq on 127.0.0.1.

Wrong compatibility hash, truncated payload, oversize payload, wrong version: each is
refused with a log line that says why, and the listener keeps serving a valid client.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from collections.abc import Iterator

import msgspec
import pytest
import zmq

from kvbridge.nixl.handshake import (
    HANDSHAKE_VERSION,
    MAX_REQUEST_BYTES,
    HandshakeEnvelope,
    HandshakeError,
    HandshakeListener,
    Handshaker,
    HandshakeRequest,
    compat_hash,
    encode_envelope,
)
from reliability.wire_cases import HASH, METADATA, SPEC

OTHER_HASH = compat_hash(dataclasses.replace(SPEC, block_size=8))


@pytest.fixture
def listener() -> Iterator[HandshakeListener]:
    srv = HandshakeListener("127.0.0.1", 0, encode_envelope(METADATA, HASH), HASH)
    yield srv
    srv.close()


@pytest.fixture
def zctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.term()


def ask(ctx: zmq.Context[zmq.Socket[bytes]], port: int, data: bytes) -> bytes | None:
    """Send one raw request; the reply, or None if none came within 2 s."""
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"tcp://127.0.0.1:{port}")
        sock.send(data)
        return sock.recv() if sock.poll(2000) else None
    finally:
        sock.close()


def request(version: int = HANDSHAKE_VERSION, hash_: str = HASH) -> bytes:
    return msgspec.msgpack.encode(
        HandshakeRequest(version=version, compat_hash=hash_, engine_id="decode")
    )


def fetch(port: int, hash_: str = HASH, timeout_s: float = 5.0) -> object:
    """A consumer's handshake: the metadata, or the HandshakeError it ended with."""
    hs = Handshaker(local_engine_id="decode", hash_=hash_, timeout_s=timeout_s, max_bytes=1 << 20)
    try:
        future = hs.fetch("prefill", "127.0.0.1", port)
        error = future.exception(timeout=timeout_s + 5)
        return error if error is not None else future.result()
    finally:
        hs.close()


def assert_serves(listener: HandshakeListener) -> None:
    assert fetch(listener.port) == METADATA


def test_wrong_compat_hash_is_refused_by_the_consumer_with_both_sides_logging(
    listener: HandshakeListener, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kvbridge.nixl.handshake")
    assert OTHER_HASH != HASH
    error = fetch(listener.port, hash_=OTHER_HASH)
    assert isinstance(error, HandshakeError) and not error.retriable
    assert "compatibility hash mismatch" in str(error)
    assert f"producer {HASH[:12]}" in str(error) and f"consumer {OTHER_HASH[:12]}" in str(error)
    assert any(
        f"hash {OTHER_HASH[:12]} (ours {HANDSHAKE_VERSION} / {HASH[:12]})" in r.getMessage()
        for r in caplog.records
    ), caplog.text
    assert_serves(listener)


def test_wrong_version_is_logged_by_the_listener_and_refused_by_the_consumer(
    listener: HandshakeListener,
    zctx: zmq.Context[zmq.Socket[bytes]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="kvbridge.nixl.handshake")
    reply = ask(zctx, listener.port, request(version=HANDSHAKE_VERSION + 1))
    assert reply is not None
    assert f"asks with version {HANDSHAKE_VERSION + 1}" in caplog.text
    # A producer of another version: the consumer refuses its answer, naming both versions.
    newer = msgspec.msgpack.encode(
        HandshakeEnvelope(
            version=HANDSHAKE_VERSION + 1,
            compat_hash=HASH,
            payload=msgspec.msgpack.encode(METADATA),
        )
    )
    other = HandshakeListener("127.0.0.1", 0, newer, HASH)
    try:
        error = fetch(other.port)
    finally:
        other.close()
    assert isinstance(error, HandshakeError)
    assert f"handshake version {HANDSHAKE_VERSION + 1} from the producer, expected" in str(error)
    assert_serves(listener)


def test_truncated_requests_are_refused_with_a_warning(
    listener: HandshakeListener,
    zctx: zmq.Context[zmq.Socket[bytes]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="kvbridge.nixl.handshake")
    valid = request()
    for k in (0, 1, len(valid) // 2, len(valid) - 1):
        reply = ask(zctx, listener.port, valid[:k])
        assert reply is not None
        refusal = msgspec.msgpack.decode(reply, type=HandshakeEnvelope)
        assert refusal.error is not None and "malformed handshake request" in refusal.error
    warnings = [r for r in caplog.records if "malformed handshake request" in r.getMessage()]
    assert len(warnings) == 4 and all(r.levelno == logging.WARNING for r in warnings)
    assert f"side channel on port {listener.port}" in warnings[0].getMessage()
    assert listener.num_malformed == 4
    assert_serves(listener)


def test_oversize_requests_are_refused_and_the_listener_keeps_serving(
    listener: HandshakeListener, zctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    for size in (MAX_REQUEST_BYTES + 1, 4 * MAX_REQUEST_BYTES):
        reply = ask(zctx, listener.port, b"\x00" * size)
        assert reply is not None
        assert "too large" in (msgspec.msgpack.decode(reply, type=HandshakeEnvelope).error or "")
    # Far over the limit, zmq itself cuts the peer off (bounded memory).
    assert ask(zctx, listener.port, b"\x00" * (16 * MAX_REQUEST_BYTES)) is None
    assert listener.num_served == 0
    assert_serves(listener)


def test_oversize_request_leaves_a_log_line(
    listener: HandshakeListener,
    zctx: zmq.Context[zmq.Socket[bytes]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="kvbridge")
    ask(zctx, listener.port, b"\x00" * (MAX_REQUEST_BYTES + 1))
    assert_serves(listener)  # gives the listener time to notice
    assert any(
        "MAXMSGSIZE" in r.getMessage() or "too large" in r.getMessage() for r in caplog.records
    ), caplog.text


def test_oversize_answer_is_named_as_such() -> None:
    big = METADATA.__class__(**{**msgspec.structs.asdict(METADATA), "agent_metadata": b"x" * 4096})
    srv = HandshakeListener("127.0.0.1", 0, encode_envelope(big, HASH), HASH)
    hs = Handshaker(local_engine_id="decode", hash_=HASH, timeout_s=1.0, max_bytes=1024)
    try:
        error = hs.fetch("prefill", "127.0.0.1", srv.port).exception(timeout=10)
    finally:
        hs.close()
        srv.close()
    assert isinstance(error, HandshakeError) and "exceeds" in str(error)


def test_garbage_frames_raw_tcp_and_many_bad_clients_do_not_stop_the_listener(
    listener: HandshakeListener, zctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    dealer = zctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://127.0.0.1:{listener.port}")
    dealer.send_multipart([b"", b"a", b"b", b"c"])  # three frames
    assert dealer.poll(2000)
    reply = msgspec.msgpack.decode(dealer.recv_multipart()[-1], type=HandshakeEnvelope)
    assert reply.error is not None and "expected one frame" in reply.error
    dealer.send_multipart([b"", b"lease-not-registered", b"x"])  # unknown two-frame kind
    assert dealer.poll(2000)
    assert "expected one frame" in (
        msgspec.msgpack.decode(dealer.recv_multipart()[-1], type=HandshakeEnvelope).error or ""
    )
    dealer.close()
    for _ in range(20):  # not zmq at all
        with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)))
    socks = []
    for i in range(50):  # half-open clients that never read their answer
        s = zctx.socket(zmq.REQ)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(f"tcp://127.0.0.1:{listener.port}")
        s.send(request() if i % 2 else b"\xc1junk")
        socks.append(s)
    try:
        assert_serves(listener)
    finally:
        for s in socks:
            s.close()
    assert_serves(listener)
