"""Hypothesis strategies for bad wire input: random, truncated, mutated and oversize bytes, and
JSON/msgpack-shaped values of any type."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from kvbridge.connector.types import KVCacheGroupSpec, KVCacheSpec
from kvbridge.nixl.handshake import compat_hash
from support.nixl_samples import sample_agent_metadata

FUZZ_EXAMPLES = 1000

# A producer's side-channel answer, for the NIXL wire tests.
SPEC = KVCacheSpec(
    block_size=4,
    num_blocks=16,
    num_layers=2,
    num_kv_heads=2,
    head_dim=4,
    dtype="float32",
    groups=(KVCacheGroupSpec("g0", ("layers.0", "layers.1")),),
)
HASH = compat_hash(SPEC)
METADATA = sample_agent_metadata()


def any_values(min_int: int, max_int: int) -> st.SearchStrategy[Any]:
    """Any JSON-shaped value (None, bool, int, float, str, list, dict), a few levels deep."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=min_int, max_value=max_int),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=20),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=12), inner, max_size=5)
        ),
        max_leaves=12,
    )


json_values = any_values(-(2**70), 2**70)
msgpack_values = any_values(-(2**63), 2**64 - 1)  # what msgpack can encode


def truncations(valid: bytes) -> st.SearchStrategy[bytes]:
    """Every proper prefix of ``valid``."""
    return st.integers(0, len(valid) - 1).map(lambda k: valid[:k])


@st.composite
def mutations(draw: st.DrawFn, valid: bytes) -> bytes:
    """``valid`` with 1-6 random byte edits: overwrite, insert or delete."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(("set", "insert", "delete")))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif data:
            del data[pos]
    return bytes(data)


def oversize(valid: bytes, limit: int) -> st.SearchStrategy[bytes]:
    """``valid`` padded (or random bytes) past ``limit``."""
    pad = st.integers(limit + 1 - len(valid), 2 * limit).map(lambda n: valid + b"\x00" * n)
    repeat = st.binary(min_size=1, max_size=32).map(lambda b: b * (limit // len(b) + 1))
    return st.one_of(pad, repeat)


def with_field(base: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """``base`` with one field replaced by any JSON value, dropped, or an unknown one added."""
    keys = sorted(base)

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        out = dict(base)
        op = draw(st.sampled_from(("replace", "drop", "add")))
        if op == "replace":
            out[draw(st.sampled_from(keys))] = draw(json_values)
        elif op == "drop":
            out.pop(draw(st.sampled_from(keys)))
        else:
            out[draw(st.text(min_size=1, max_size=12))] = draw(json_values)
        return out

    return build()
