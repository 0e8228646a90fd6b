"""Fuzz the side channel's decoders: every input ends in a typed result or a typed error.

- ``decode_envelope`` (consumer, two-phase): random bytes, truncated / mutated / oversize valid
  answers, well-formed envelopes around a bad payload, envelopes of any shape.
- the listener over real zmq: 1,000 random requests, then it still serves a valid client.
- ``decode_notif`` (producer, NIXL notifications) and the lease-query handler (producer, side
  channel): random and mutated payloads.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import msgspec
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbridge.nixl.handshake import (
    HANDSHAKE_VERSION,
    MAX_REQUEST_BYTES,
    HandshakeEnvelope,
    HandshakeError,
    HandshakeListener,
    Handshaker,
    HandshakeRequest,
    NixlAgentMetadata,
    decode_envelope,
    encode_envelope,
)
from kvbridge.nixl.lease_confirm import (
    LeaseAnswer,
    LeaseConfirmer,
    LeaseQuery,
    lease_query_handler,
)
from kvbridge.nixl.leases import LeaseStatus
from kvbridge.nixl.metadata import NixlNotif, decode_notif, encode_notif
from reliability.wire_cases import (
    FUZZ_EXAMPLES,
    HASH,
    METADATA,
    msgpack_values,
    mutations,
    oversize,
    truncations,
)

PAYLOAD = msgspec.msgpack.encode(METADATA)
ANSWER = encode_envelope(METADATA, HASH)
LIMIT = 4096
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None)
_lease_handler = lease_query_handler(
    "prefill", "prefill-r0-abc", lambda rid: LeaseStatus("held", 1.0)
)

# Strings that are not UTF-8: msgspec raises UnicodeDecodeError for them, not DecodeError.
_BAD_UTF8_ENVELOPE = b"\x82\xa7version\x01\xabcompat_hash\xa1\x80"
_BAD_UTF8_QUERY = b"\x83\xa3seq\x01\xa9engine_id\xa1\x80\xabrequest_ids\x90"


def decode_or_error(data: bytes) -> NixlAgentMetadata | HandshakeError:
    """The consumer's verdict on one answer; any other exception fails the test."""
    try:
        md = decode_envelope(data, expected_hash=HASH, max_bytes=LIMIT)
    except HandshakeError as e:
        assert str(e) and not e.retriable
        return e
    assert isinstance(md, NixlAgentMetadata)
    return md


def envelope(payload: bytes, *, version: int = HANDSHAKE_VERSION, hash_: str = HASH) -> bytes:
    return msgspec.msgpack.encode(
        HandshakeEnvelope(version=version, compat_hash=hash_, payload=payload)
    )


@FUZZ
@given(st.binary(max_size=2 * LIMIT))
def test_random_answers_decode_or_fail_typed(data: bytes) -> None:
    decode_or_error(data)


@FUZZ
@given(mutations(ANSWER))
def test_mutated_answers_decode_or_fail_typed(data: bytes) -> None:
    decode_or_error(data)  # a mutation may still be a valid answer, with other values


def test_every_truncation_of_a_valid_answer_is_refused() -> None:
    """Exhaustive: each proper prefix of the envelope, and of the payload inside a valid one."""
    cases = [ANSWER[:k] for k in range(len(ANSWER))]
    cases += [envelope(PAYLOAD[:k]) for k in range(len(PAYLOAD))]
    assert len(cases) > 300
    for data in cases:
        assert isinstance(decode_or_error(data), HandshakeError), data


@FUZZ
@given(oversize(ANSWER, LIMIT))
def test_oversize_answers_are_refused_before_decoding(data: bytes) -> None:
    result = decode_or_error(data)
    assert isinstance(result, HandshakeError) and "exceeds" in str(result)


@FUZZ
@given(st.one_of(st.binary(max_size=512), mutations(PAYLOAD)))
def test_phase_two_decodes_only_agent_metadata(payload: bytes) -> None:
    result = decode_or_error(envelope(payload))
    if isinstance(result, HandshakeError):
        assert "malformed agent metadata" in str(result)


@FUZZ
@given(
    st.one_of(
        st.tuples(st.just(HANDSHAKE_VERSION), st.text(max_size=70).filter(lambda h: h != HASH)),
        st.tuples(
            st.integers(-(2**63), 2**63 - 1).filter(lambda v: v != HANDSHAKE_VERSION), st.just(HASH)
        ),
    ),
    st.binary(max_size=256),
)
def test_wrong_version_or_hash_is_refused_without_touching_the_payload(
    head: tuple[int, str], garbage: bytes
) -> None:
    version, hash_ = head
    result = decode_or_error(envelope(garbage, version=version, hash_=hash_))
    assert isinstance(result, HandshakeError)
    if version != HANDSHAKE_VERSION:
        assert f"handshake version {version} from the producer" in str(result)
    else:
        assert "compatibility hash mismatch" in str(result)


@FUZZ
@given(
    st.one_of(
        msgpack_values,
        st.fixed_dictionaries(
            {},
            optional={
                k: msgpack_values | st.binary(max_size=64)
                for k in ("version", "compat_hash", "payload", "error")
            },
        ),
    )
)
def test_envelopes_of_any_shape_decode_or_fail_typed(value: object) -> None:
    decode_or_error(msgspec.msgpack.encode(value))


# -- the listener, over real zmq -----------------------------------------------------------------
@pytest.fixture(scope="module")
def listener() -> Iterator[HandshakeListener]:
    srv = HandshakeListener("127.0.0.1", 0, ANSWER, HASH)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def req_socket(listener: HandshakeListener) -> Iterator[zmq.Socket[bytes]]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{listener.port}")
    yield sock
    sock.close()
    ctx.term()


_REQUEST = msgspec.msgpack.encode(
    HandshakeRequest(version=HANDSHAKE_VERSION, compat_hash=HASH, engine_id="decode")
)


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=1024),
        truncations(_REQUEST),
        mutations(_REQUEST),
        msgpack_values.map(msgspec.msgpack.encode),
    )
)
def test_listener_answers_every_request_with_metadata_or_a_typed_refusal(
    listener: HandshakeListener, req_socket: zmq.Socket[bytes], data: bytes
) -> None:
    assert len(data) < MAX_REQUEST_BYTES
    req_socket.send(data)
    assert req_socket.poll(5000), "the listener stopped answering"
    reply = req_socket.recv()
    try:
        msgspec.msgpack.decode(data, type=HandshakeRequest)
        valid = True
    except (msgspec.DecodeError, UnicodeDecodeError):
        valid = False
    if valid:
        assert reply == ANSWER  # any version/hash: the consumer decides (two-phase)
        return
    refusal = msgspec.msgpack.decode(reply, type=HandshakeEnvelope)
    assert refusal.error is not None and "malformed handshake request" in refusal.error


def test_listener_still_serves_a_valid_client_after_the_fuzz(listener: HandshakeListener) -> None:
    hs = Handshaker(local_engine_id="decode", hash_=HASH, timeout_s=5.0, max_bytes=1 << 20)
    try:
        assert hs.fetch("prefill", "127.0.0.1", listener.port).result(timeout=5) == METADATA
    finally:
        hs.close()
    assert listener.num_malformed > 0  # the fuzz really reached it


# -- NIXL notifications and lease queries (producer side) ----------------------------------------
_NOTIF = encode_notif("done", ["req-1", "req-2"])


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=256),
        truncations(_NOTIF),
        mutations(_NOTIF),
        msgpack_values.map(msgspec.msgpack.encode),
    )
)
def test_notifications_decode_or_raise_value_error(data: bytes) -> None:
    try:
        notif = decode_notif(data)
    except ValueError:  # the worker counts these and drops them
        return
    assert isinstance(notif, NixlNotif)
    assert notif.kind in ("done", "heartbeat", "release")
    assert all(isinstance(r, str) for r in notif.request_ids)


_QUERY = msgspec.msgpack.encode(LeaseQuery(seq=3, engine_id="prefill", request_ids=["a", "b"]))


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=256),
        truncations(_QUERY),
        mutations(_QUERY),
        msgpack_values.map(msgspec.msgpack.encode),
    )
)
def test_lease_queries_always_get_a_decodable_answer(data: bytes) -> None:
    answer = msgspec.msgpack.decode(_lease_handler(data), type=LeaseAnswer)
    assert answer.engine_id == "prefill" and answer.instance_id == "prefill-r0-abc"
    try:
        query = msgspec.msgpack.decode(data, type=LeaseQuery)
    except (msgspec.DecodeError, UnicodeDecodeError):
        assert answer.error is not None and "malformed lease query" in answer.error
        return
    if query.engine_id != "prefill" or len(query.request_ids) > 256:
        assert answer.error is not None and not answer.states
    else:
        assert answer.error is None and answer.states == dict.fromkeys(query.request_ids, "held")


# -- regressions: strings that are not UTF-8 -----------------------------------------------------
def test_non_utf8_envelope_is_a_handshake_error() -> None:
    with pytest.raises(HandshakeError, match="malformed handshake envelope"):
        decode_envelope(_BAD_UTF8_ENVELOPE, expected_hash=HASH, max_bytes=LIMIT)


def test_non_utf8_lease_query_gets_a_refusal() -> None:
    answer = msgspec.msgpack.decode(_lease_handler(_BAD_UTF8_QUERY), type=LeaseAnswer)
    assert answer.error is not None and "malformed lease query" in answer.error


def test_non_utf8_lease_answer_does_not_escape_the_consumer() -> None:
    """A producer's garbled answer must be dropped, not raised into the consumer's step."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    confirmer = LeaseConfirmer(resend_s=10.0)
    try:
        confirmer.ask(
            "d-1",
            ("127.0.0.1", port),
            engine_id="prefill",
            instance_id="i",
            request_id="p-1",
            now=0.0,
        )
        confirmer.send_due(0.0)
        assert router.poll(5000)
        identity, *_ = router.recv_multipart()
        bad = b"\x84\xa3seq\x01\xa9engine_id\xa7prefill\xabinstance_id\xa1\x80\xa6states\x80"
        router.send_multipart([identity, b"", bad])
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            assert confirmer.collect(time.monotonic()) == {}
            time.sleep(0.01)
    finally:
        confirmer.close()
        router.close()
        ctx.term()
