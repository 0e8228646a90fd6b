"""Fuzz ``kv_transfer_params``: the validator and the NIXL scheduler that acts on it.

Every input gives parsed params or ``KVTransferParamsError`` naming a field; the scheduler
never raises on any of them, counts only tokens it can load, and keeps no state once the
request has ended.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from kvbridge.config import TransferConfig
from kvbridge.connector.base import ConnectorOutput
from kvbridge.connector.types import KVCacheGroupSpec, KVCacheSpec, SchedulerStep, SimpleRequest
from kvbridge.nixl.metadata import NixlConnectorMetadata
from kvbridge.nixl.params import (
    KVTransferParamsError,
    TransferParams,
    check_block_count,
    parse_kv_transfer_params,
    remote_prefill_params,
)
from kvbridge.nixl.scheduler import NixlScheduler
from reliability.wire_cases import FUZZ_EXAMPLES, json_values, with_field

FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None)
BS = 4
SPEC = KVCacheSpec(
    block_size=BS,
    num_blocks=64,
    num_layers=2,
    num_kv_heads=2,
    head_dim=4,
    dtype="float32",
    groups=(KVCacheGroupSpec("g0", ("layers.0", "layers.1")),),
)
VALID = remote_prefill_params(
    engine_id="prefill",
    host="127.0.0.1",
    port=14579,
    block_ids=([3, 7, 1],),
    request_id="p-1",
    tp_size=1,
)
FIELDS = [
    "do_remote_decode",
    "do_remote_prefill",
    "remote_engine_id",
    "remote_host",
    "remote_port",
    "remote_block_ids",
    "remote_request_id",
    "tp_size",
]
block_ids = st.one_of(
    st.lists(st.integers(-2, 70), max_size=6),
    st.lists(st.lists(st.integers(-2, 70), max_size=6), max_size=3),
    st.lists(st.one_of(st.integers(0, 70), st.booleans(), st.text(max_size=2)), max_size=4),
)
typed_field = {
    "do_remote_decode": st.booleans(),
    "do_remote_prefill": st.booleans(),
    "remote_engine_id": st.text(max_size=8),
    "remote_host": st.sampled_from(["127.0.0.1", "", "::1", "host"]),
    "remote_port": st.integers(-5, 70000),
    "remote_block_ids": block_ids,
    "remote_request_id": st.text(max_size=8),
    "tp_size": st.integers(-1, 3),
}
params = st.one_of(
    json_values,  # anything at all, usually not an object
    st.fixed_dictionaries({}, optional={k: json_values for k in FIELDS}),
    st.fixed_dictionaries({}, optional=typed_field),  # well-typed, values at the edges
    with_field(VALID),  # a producer's answer with one field broken
)


def parse(raw: Any) -> TransferParams | KVTransferParamsError | None:
    try:
        out = parse_kv_transfer_params(raw)
    except KVTransferParamsError as e:
        assert str(e).startswith("kv_transfer_params"), e
        return e
    if raw is None:
        assert out is None
        return None
    assert isinstance(raw, Mapping) and isinstance(out, TransferParams)
    remote = out.remote_prefill
    if remote is not None:
        assert not out.do_remote_decode
        assert remote.remote_engine_id and remote.remote_host
        assert 1 <= remote.remote_port <= 65535 and remote.tp_size >= 1
        assert remote.remote_block_ids
        for group in remote.remote_block_ids:
            assert all(type(b) is int and b >= 0 for b in group)
    return out


@FUZZ
@given(params, st.integers(1, 40))
def test_validator_returns_params_or_a_typed_error_naming_the_field(
    raw: Any, num_prompt_tokens: int
) -> None:
    out = parse(raw)
    if isinstance(out, TransferParams) and out.remote_prefill is not None:
        try:
            check_block_count(out.remote_prefill, num_prompt_tokens, BS, 1)
        except KVTransferParamsError as e:
            assert "remote_block_ids" in str(e)


def test_the_unbroken_producer_answer_parses() -> None:
    out = parse(VALID)
    assert isinstance(out, TransferParams) and out.remote_prefill is not None
    assert out.remote_prefill.remote_block_ids == ([3, 7, 1],)


# -- the scheduler that acts on them ---------------------------------------------------------------
_config = TransferConfig(
    kv_connector="NixlConnector",
    kv_role="kv_both",
    engine_id="fuzzed",
    kv_connector_extra_config={"nixl_wrapper": "fake", "side_channel_port": 14579},
)
_sched = NixlScheduler(_config, SPEC)
_ids = itertools.count()
_steps = itertools.count()
_outcomes = {"loads": 0, "holds": 0}  # how often the fuzz reached each path


def _step(finished: frozenset[str] = frozenset()) -> NixlConnectorMetadata:
    meta = _sched.build_connector_meta(SchedulerStep(next(_steps), finished_req_ids=finished))
    assert isinstance(meta, NixlConnectorMetadata)
    _sched.check_integrity()
    return meta


@st.composite
def consistent(draw: st.DrawFn) -> tuple[Any, int]:
    """Well-formed remote-prefill params with a prompt length their blocks can hold."""
    ids = draw(st.lists(st.integers(0, 63), min_size=1, max_size=10, unique=True))  # no reuse
    raw = remote_prefill_params(
        engine_id=draw(st.sampled_from(["prefill", "other"])),
        host="127.0.0.1",
        port=draw(st.integers(1, 65535)),
        block_ids=(ids,),
        request_id=draw(st.text(max_size=4)),
        tp_size=draw(st.sampled_from([1, 1, 1, 2])),
    )
    return raw, draw(st.integers((len(ids) - 1) * BS + 1, len(ids) * BS))


@FUZZ
@given(
    st.one_of(
        st.tuples(params, st.integers(1, 40)),
        consistent(),
        st.tuples(st.just({"do_remote_decode": True}), st.integers(1, 40)),
    ),
    st.integers(0, 40),
)
def test_scheduler_never_raises_and_forgets_the_request_when_it_ends(
    case: tuple[Any, int], computed: int
) -> None:
    raw, num_prompt_tokens = case
    rid = f"r{next(_ids)}"
    computed = min(computed // BS * BS, num_prompt_tokens - 1)  # a local prefix-cache hit
    req = SimpleRequest(
        rid, list(range(num_prompt_tokens)), kv_transfer_params=raw, num_computed_tokens=computed
    )
    count, load_async = _sched.get_num_new_matched_tokens(req, computed)
    assert count is not None and 0 <= count <= num_prompt_tokens - 1 - computed
    assert load_async == (count > 0)
    blocks = list(range(-(-num_prompt_tokens // BS)))
    _sched.update_state_after_alloc(req, (blocks,), count)
    shipped = _step()
    if count:
        _outcomes["loads"] += 1
        spec = shipped.reqs_to_recv[rid]
        assert len(spec.local_block_ids[0]) == len(spec.remote_block_ids[0])
    # The request ends (done or aborted) with its whole prompt computed.
    req.num_computed_tokens = num_prompt_tokens
    delay, out_params = _sched.request_finished(req, blocks)
    assert delay == (out_params is not None)
    _outcomes["holds"] += delay
    _step(frozenset({rid}))
    _sched.update_connector_output(
        ConnectorOutput(
            finished_sending=frozenset({rid}) if delay else frozenset(),
            finished_recving=frozenset({rid}) if count else frozenset(),
        )
    )
    assert not _sched.has_request_state(rid)
    assert _sched.num_held_for_remote_decode == 0 and _sched.num_waiting_for_remote_kv == 0


def test_the_fuzz_reached_remote_loads_and_holds() -> None:
    assert _outcomes["loads"] > 100 and _outcomes["holds"] > 100, _outcomes
