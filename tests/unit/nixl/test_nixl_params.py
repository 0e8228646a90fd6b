"""kv_transfer_params validation, block-count checks, and the extra-config settings."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbridge.config import ConfigError, TransferConfig
from kvbridge.nixl.params import (
    KVTransferParamsError,
    check_block_count,
    parse_kv_transfer_params,
    remote_prefill_params,
)
from kvbridge.nixl.settings import NixlSettings

GOOD: dict[str, Any] = {
    "do_remote_prefill": True,
    "do_remote_decode": False,
    "remote_engine_id": "prefill-0",
    "remote_host": "127.0.0.1",
    "remote_port": 5555,
    "remote_block_ids": [3, 4, 5],
    "remote_request_id": "req-p",
    "tp_size": 1,
}
DROP = object()


def test_producer_params_round_trip_through_the_validator() -> None:
    out = remote_prefill_params(
        engine_id="e", host="h", port=7, block_ids=([1, 2],), request_id="r", tp_size=1
    )
    parsed = parse_kv_transfer_params(out)
    assert parsed is not None and parsed.remote_prefill is not None
    assert parsed.remote_prefill.remote_block_ids == ([1, 2],)
    assert parsed.remote_prefill.remote_request_id == "r"
    two = remote_prefill_params(
        engine_id="e", host="h", port=7, block_ids=([1], [9]), request_id="r", tp_size=1
    )
    assert two["remote_block_ids"] == [[1], [9]]
    parsed_two = parse_kv_transfer_params(two)
    assert parsed_two is not None and parsed_two.remote_prefill is not None
    assert parsed_two.remote_prefill.remote_block_ids == ([1], [9])


def test_decode_request_and_none() -> None:
    assert parse_kv_transfer_params(None) is None
    parsed = parse_kv_transfer_params({"do_remote_decode": True})
    assert parsed is not None and parsed.do_remote_decode and parsed.remote_prefill is None


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"remote_engine_id": DROP}, "remote_engine_id"),
        ({"remote_host": 7}, "remote_host"),
        ({"remote_port": "5555"}, "remote_port"),
        ({"remote_port": True}, "remote_port"),
        ({"remote_port": 70000}, "remote_port"),
        ({"remote_block_ids": "1,2"}, "remote_block_ids"),
        ({"remote_block_ids": [1, -2]}, "remote_block_ids"),
        ({"remote_block_ids": [[1], 2]}, "remote_block_ids"),
        ({"remote_block_ids": []}, "remote_block_ids"),
        ({"tp_size": 0}, "tp_size"),
        ({"do_remote_prefill": "yes"}, "do_remote_prefill"),
        ({"do_remote_decode": True}, "do_remote_prefill"),
        ({"remote_engine": "x"}, "remote_engine"),
        ({"remote_engine_id": ""}, "remote_engine_id"),
    ],
)
def test_malformed_params_name_the_field(change: dict[str, Any], field: str) -> None:
    params = {k: v for k, v in {**GOOD, **change}.items() if v is not DROP}
    with pytest.raises(KVTransferParamsError, match=rf"^kv_transfer_params\.{field}:"):
        parse_kv_transfer_params(params)


def test_non_object_params_are_rejected() -> None:
    with pytest.raises(KVTransferParamsError, match="expected an object"):
        parse_kv_transfer_params([1, 2])  # type: ignore[arg-type]


def test_block_count_must_match_the_prompt() -> None:
    parsed = parse_kv_transfer_params(GOOD)
    assert parsed is not None and parsed.remote_prefill is not None
    check_block_count(parsed.remote_prefill, 12, 4, 1)  # 12 tokens = 3 blocks of 4
    check_block_count(parsed.remote_prefill, 9, 4, 1)  # partial last block
    with pytest.raises(
        KVTransferParamsError, match="3 blocks, but the prompt of 13 tokens fills 4"
    ):
        check_block_count(parsed.remote_prefill, 13, 4, 1)
    with pytest.raises(KVTransferParamsError, match="1 KV cache group"):
        check_block_count(parsed.remote_prefill, 12, 4, 2)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.sampled_from([*GOOD, "junk"]) | st.text(max_size=5), json_values, max_size=9)
)
def test_fuzzed_params_give_a_typed_answer_or_a_typed_error(raw: dict[str, Any]) -> None:
    try:
        parsed = parse_kv_transfer_params(raw)
    except KVTransferParamsError as e:
        assert str(e).startswith("kv_transfer_params")
        return
    assert parsed is not None
    if parsed.remote_prefill is not None:
        assert all(
            isinstance(b, int) and b >= 0 for g in parsed.remote_prefill.remote_block_ids for b in g
        )


def _cfg(**extra: Any) -> TransferConfig:
    return TransferConfig(kv_connector="NixlConnector", kv_connector_extra_config=extra)


def test_settings_defaults_follow_the_spec() -> None:
    s = NixlSettings.from_config(_cfg())
    assert (s.kv_lease_duration_s, s.abort_timeout_s) == (30, 480)
    assert s.heartbeat_interval_s is None and s.heartbeat_for(30.0) == 5.0  # 5 s by default
    assert s.transfer_timeout_s == 30 and s.side_channel_host == "127.0.0.1"
    assert s.side_channel_port == 14579 and s.backends == ("UCX",)


def test_a_short_lease_alone_is_accepted_and_the_heartbeat_follows_the_producers_lease() -> None:
    """``kv_lease_duration_s: 2`` alone was refused (the 5 s default heartbeat is not below
    it). The heartbeat now follows the lease the producer announces (a third of it, at most
    5 s), or this engine's own lease when the producer announces none."""
    s = NixlSettings.from_config(_cfg(kv_lease_duration_s=2))
    assert s.heartbeat_for(0.0) == pytest.approx(2 / 3)  # the producer did not say
    assert s.heartbeat_for(0.6) == pytest.approx(0.2)
    assert s.heartbeat_for(300.0) == 5.0
    explicit = NixlSettings.from_config(_cfg(heartbeat_interval_s=1))
    assert explicit.heartbeat_for(0.0) == explicit.heartbeat_for(30.0) == 1.0
    with pytest.raises(ValueError, match=r"heartbeat_interval_s \(1\) is not below .* \(0.5\)"):
        explicit.heartbeat_for(0.5)


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ({"kv_lease_duration": 1, "kv_lease_duration_s": 2}, "kv_lease_duration"),
        ({"lease": 1}, "lease"),
        ({"heartbeat_interval_s": "5"}, "heartbeat_interval_s"),
        ({"heartbeat_interval_s": 40}, "heartbeat_interval_s"),
        ({"kv_lease_duration_s": 600}, "kv_lease_duration_s"),
        ({"side_channel_port": 70000}, "side_channel_port"),
        ({"side_channel_port": True}, "side_channel_port"),
        ({"backends": []}, "backends"),
        ({"nixl_wrapper": "mock"}, "nixl_wrapper"),
        ({"transfer_timeout_s": 0}, "transfer_timeout_s"),
    ],
)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_bad_extra_config_names_the_key(extra: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"kv_connector_extra_config\.{key}:"):
        NixlSettings.from_config(_cfg(**extra))


def test_old_key_names_still_work_with_a_deprecation_warning() -> None:
    with pytest.warns(DeprecationWarning, match="abort_request_timeout"):
        s = NixlSettings.from_config(_cfg(abort_request_timeout=100))
    assert s.abort_timeout_s == 100.0
    with pytest.warns(DeprecationWarning, match="nixl_side_channel_port"):
        s = NixlSettings.from_config(_cfg(nixl_side_channel_port=0))
    assert s.side_channel_port == 0
