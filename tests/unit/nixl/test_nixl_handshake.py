"""Side channel: real zmq sockets on 127.0.0.1, two-phase decode, a listener that survives."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import msgspec
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st
from nixl_helpers import silent_port, spec

from kvbridge.nixl.handshake import (
    HANDSHAKE_VERSION,
    MAX_REQUEST_BYTES,
    HandshakeEnvelope,
    HandshakeError,
    HandshakeListener,
    Handshaker,
    compat_hash,
    decode_envelope,
    encode_envelope,
)
from support.nixl_samples import sample_agent_metadata

HASH = compat_hash(spec())


metadata = sample_agent_metadata


@pytest.fixture
def listener() -> Iterator[HandshakeListener]:
    srv = HandshakeListener("127.0.0.1", 0, encode_envelope(metadata(), HASH), HASH)
    yield srv
    srv.close()


def client(hash_: str = HASH, timeout_s: float = 5.0) -> Handshaker:
    return Handshaker(local_engine_id="decode", hash_=hash_, timeout_s=timeout_s, max_bytes=1 << 20)


def test_fetch_returns_the_producers_metadata_and_caches_it(listener: HandshakeListener) -> None:
    hs = client()
    try:
        future = hs.fetch("prefill", "127.0.0.1", listener.port)
        assert future.result(timeout=5) == metadata()
        assert hs.fetch("prefill", "127.0.0.1", listener.port) is future
        assert listener.num_served == 1
        hs.invalidate("prefill")
        assert hs.fetch("prefill", "127.0.0.1", listener.port) is not future
    finally:
        hs.close()


def test_hash_mismatch_is_rejected_before_the_payload_is_decoded(
    listener: HandshakeListener,
) -> None:
    other = compat_hash(spec(block_size=8))
    assert other != HASH
    hs = client(hash_=other)
    try:
        error = hs.fetch("prefill", "127.0.0.1", listener.port).exception(timeout=5)
    finally:
        hs.close()
    assert isinstance(error, HandshakeError) and not error.retriable
    assert "compatibility hash mismatch" in str(error)


def test_version_mismatch_and_garbage_payloads_are_clear_errors() -> None:
    old = msgspec.msgpack.encode(
        HandshakeEnvelope(version=HANDSHAKE_VERSION + 1, compat_hash=HASH, payload=b"\xff")
    )
    with pytest.raises(HandshakeError, match=rf"version {HANDSHAKE_VERSION + 1} from the producer"):
        decode_envelope(old, expected_hash=HASH, max_bytes=1 << 20)
    # Matching envelope, payload not decodable: only now is the payload touched.
    bad = msgspec.msgpack.encode(
        HandshakeEnvelope(version=HANDSHAKE_VERSION, compat_hash=HASH, payload=b"\xc1")
    )
    with pytest.raises(HandshakeError, match="malformed agent metadata"):
        decode_envelope(bad, expected_hash=HASH, max_bytes=1 << 20)
    with pytest.raises(HandshakeError, match="exceeds"):
        decode_envelope(b"x" * 2048, expected_hash=HASH, max_bytes=1024)
    with pytest.raises(HandshakeError, match="malformed handshake envelope"):
        decode_envelope(b"\x00garbage", expected_hash=HASH, max_bytes=1 << 20)


def test_disabled_compat_enforcement_only_warns() -> None:
    data = encode_envelope(metadata(), "other-hash")
    md = decode_envelope(data, expected_hash=HASH, max_bytes=1 << 20, enforce_compat=False)
    assert md.engine_id == "prefill"


def test_listener_survives_garbage_and_keeps_serving(listener: HandshakeListener) -> None:
    ctx = zmq.Context()
    try:
        req = ctx.socket(zmq.REQ)
        req.connect(f"tcp://127.0.0.1:{listener.port}")
        req.send(b"\x93not a request")
        assert req.poll(5000)
        reply = msgspec.msgpack.decode(req.recv(), type=HandshakeEnvelope)
        assert reply.error is not None and "malformed handshake request" in reply.error
        req.close(linger=0)
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(f"tcp://127.0.0.1:{listener.port}")
        dealer.send_multipart([b"a", b"b", b"c"])
        assert dealer.poll(5000)
        assert "expected one frame" in (
            msgspec.msgpack.decode(dealer.recv_multipart()[-1], type=HandshakeEnvelope).error or ""
        )
        dealer.send(b"x" * (MAX_REQUEST_BYTES + 1))  # oversize: zmq drops this peer
        dealer.close(linger=0)
    finally:
        ctx.term()
    with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\n\r\n" + bytes(range(256)))
    hs = client()
    try:
        assert (
            hs.fetch("prefill", "127.0.0.1", listener.port).result(timeout=5).engine_id == "prefill"
        )
    finally:
        hs.close()
    assert listener.num_malformed >= 2  # raw bytes may parse as ZMTP 1.0 frames too


def test_wrong_engine_at_the_address_is_refused(listener: HandshakeListener) -> None:
    hs = client()
    try:
        error = hs.fetch("someone-else", "127.0.0.1", listener.port).exception(timeout=5)
    finally:
        hs.close()
    assert isinstance(error, HandshakeError) and "serves engine 'prefill'" in str(error)


def test_refused_connection_fails_at_once_and_a_retry_starts_afresh() -> None:
    """Nobody listens (the producer exited): the fetch fails at once, not after ``timeout_s``.

    Checked against a broken build (``_await_answer`` ignoring the monitor): this test then
    fails, the error arriving only after the 60 s timeout."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave: nobody listens there
    hs = client(timeout_s=60.0)
    try:
        first = hs.fetch("prefill", "127.0.0.1", port)
        error = first.exception(timeout=10)  # far below the 60 s timeout
        assert isinstance(error, HandshakeError) and not error.retriable
        assert "refused the connection" in str(error)
        srv = HandshakeListener("127.0.0.1", port, encode_envelope(metadata(), HASH), HASH)
        try:
            second = hs.fetch("prefill", "127.0.0.1", port)
            assert second is not first
            assert second.result(timeout=5).engine_id == "prefill"
        finally:
            srv.close()
    finally:
        hs.close()


@pytest.mark.parametrize("how", ["accepts and closes", "zmq listener exits mid-request"])
def test_side_channel_dropping_the_connection_fails_at_once(how: str) -> None:
    """The producer exits with our request in its side channel: failed at once (a broken build
    that ignores the monitor fails this test, as the refused case)."""
    ctx = zmq.Context()
    with socket.socket() as raw:
        raw.bind(("127.0.0.1", 0))
        raw.listen()
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        port = raw.getsockname()[1]
        if how != "accepts and closes":
            raw.close()
            port = router.bind_to_random_port("tcp://127.0.0.1")

        def drop() -> None:
            if how == "accepts and closes":
                conn, _ = raw.accept()
                conn.close()
            else:
                router.recv_multipart()  # the request came: exit without answering
            router.close()

        dropper = threading.Thread(target=drop)
        dropper.start()
        hs = client(timeout_s=60.0)
        try:
            error = hs.fetch("prefill", "127.0.0.1", port).exception(timeout=10)
        finally:
            hs.close()
            dropper.join(5)
            ctx.term()
    assert isinstance(error, HandshakeError) and not error.retriable
    assert "closed the connection" in str(error)


def test_silent_side_channel_fails_within_the_timeout_as_retriable() -> None:
    """A socket that accepts and never answers (a wedged producer) is waited for."""
    with silent_port() as port:
        hs = client(timeout_s=0.3)
        try:
            error = hs.fetch("prefill", "127.0.0.1", port).exception(timeout=5)
        finally:
            hs.close()
    assert isinstance(error, HandshakeError) and error.retriable
    assert "within 0.3s" in str(error)


def test_close_stops_pending_fetches_and_threads() -> None:
    before = {t.name for t in threading.enumerate()}
    hs = client(timeout_s=60)
    with silent_port() as port:
        future = hs.fetch("prefill", "127.0.0.1", port)  # no answer: waits until closed
        hs.close()
    assert future.done()
    leftover = {t.name for t in threading.enumerate()} - before
    assert not any(name.startswith("kvbridge-handshake") for name in leftover)
    assert isinstance(hs.fetch("prefill", "127.0.0.1", 1).exception(), HandshakeError)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_fuzzed_answers_never_escape_as_other_errors(data: bytes) -> None:
    try:
        decode_envelope(data, expected_hash=HASH, max_bytes=256)
    except HandshakeError:
        pass


def test_version_mismatch_over_the_wire_is_rejected() -> None:
    future_answer = msgspec.msgpack.encode(
        HandshakeEnvelope(
            version=HANDSHAKE_VERSION + 1,
            compat_hash=HASH,
            payload=msgspec.msgpack.encode(metadata()),
        )
    )
    srv = HandshakeListener("127.0.0.1", 0, future_answer, HASH)
    hs = client()
    try:
        error = hs.fetch("prefill", "127.0.0.1", srv.port).exception(timeout=5)
    finally:
        hs.close()
        srv.close()
    assert isinstance(error, HandshakeError) and not error.retriable
    assert f"handshake version {HANDSHAKE_VERSION + 1}" in str(error)


def test_listener_answers_an_internal_error_and_keeps_serving(
    listener: HandshakeListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_answer = listener._answer
    calls = iter([RuntimeError("boom")])

    def flaky(body: list[bytes]) -> bytes:
        error = next(calls, None)
        if error is not None:
            raise error
        return real_answer(body)

    monkeypatch.setattr(listener, "_answer", flaky)
    hs = client()
    try:
        error = hs.fetch("prefill", "127.0.0.1", listener.port).exception(timeout=5)
        assert isinstance(error, HandshakeError) and "internal error: RuntimeError" in str(error)
        assert hs.fetch("prefill", "127.0.0.1", listener.port).result(timeout=5) == metadata()
    finally:
        hs.close()
