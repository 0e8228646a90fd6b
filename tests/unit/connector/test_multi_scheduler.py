"""MultiConnector scheduler-side rules (SPEC §2), one test per rule."""

from __future__ import annotations

import msgspec
import pytest
from multi_helpers import build, child, request, spec

from kvbridge.config import ConfigError
from kvbridge.connector.base import ConnectorOutput, KVConnectorRole
from kvbridge.connector.multi import MultiConnectorMetadata, MultiWorkerMetadata
from kvbridge.connector.stats import KVConnectorStats, MultiKVConnectorStats
from kvbridge.connector.types import ScheduledRequest, SchedulerStep

S = KVConnectorRole.SCHEDULER


def test_first_positive_child_wins_and_others_get_zero_tokens() -> None:
    multi, (a, b, c) = build(
        S, child("a", match=0), child("b", match=8, load_async=True), child("c", match=4)
    )
    req = request()
    assert multi.get_num_new_matched_tokens(req, 0) == (8, True)
    # Every child was asked, in order.
    assert [x.calls[0] for x in (a, b, c)] == [("match", "r1")] * 3
    multi.update_state_after_alloc(req, ([1, 2, 3],), 8)
    allocs = [x.calls[-1] for x in (a, b, c)]
    assert allocs == [("alloc", ("r1", ([1, 2, 3],), n)) for n in (0, 8, 0)]


def test_none_from_any_child_means_ask_again() -> None:
    multi, _ = build(S, child("a", match=8), child("b", match=None))
    assert multi.get_num_new_matched_tokens(request(), 0) == (None, False)


def test_no_match_returns_zero_and_all_children_get_zero() -> None:
    multi, children = build(S, child("a"), child("b"))
    req = request()
    assert multi.get_num_new_matched_tokens(req, 0) == (0, False)
    multi.update_state_after_alloc(req, ([5],), 0)
    assert [x.calls[-1][1][2] for x in children] == [0, 0]


def test_external_tokens_without_a_matching_child_is_an_error() -> None:
    multi, _ = build(S, child("a"))
    with pytest.raises(RuntimeError, match="no child matched"):
        multi.update_state_after_alloc(request(), ([1],), 4)


def test_metadata_is_a_tuple_in_child_order_every_step() -> None:
    multi, _ = build(S, child("a"), child("b"), child("c"))
    for step_id in range(3):
        meta = multi.build_connector_meta(SchedulerStep(step_id=step_id))
        assert isinstance(meta, MultiConnectorMetadata)
        assert [m.owner for m in meta.metadata] == ["a", "b", "c"]
        assert {m.step_id for m in meta.metadata} == {step_id}


def test_metadata_round_trips_through_msgpack() -> None:
    from support.recording import RecMeta

    multi, _ = build(S, child("a"), child("b"))
    meta = multi.build_connector_meta(SchedulerStep(step_id=7))
    raw = msgspec.msgpack.encode(meta)
    decoded = msgspec.msgpack.decode(raw)
    assert [m["owner"] for m in decoded["metadata"]] == ["a", "b"]
    again = msgspec.convert(decoded["metadata"][0], RecMeta)
    assert again == meta.metadata[0]


def test_each_child_receives_only_its_worker_metadata() -> None:
    from support.recording import RecWorkerMeta

    multi, (a, b) = build(S, child("a"), child("b"))
    out = ConnectorOutput(
        finished_recving=frozenset({"r1"}),
        worker_meta=MultiWorkerMetadata(metadata=(RecWorkerMeta(owner="a"), None)),
    )
    multi.update_connector_output(out)
    got_a, got_b = a.calls[-1][1], b.calls[-1][1]
    assert got_a.worker_meta == RecWorkerMeta(owner="a") and got_b.worker_meta is None
    assert got_a.finished_recving == got_b.finished_recving == frozenset({"r1"})


def test_malformed_worker_metadata_is_rejected() -> None:
    from support.recording import RecWorkerMeta

    multi, _ = build(S, child("a"), child("b"))
    with pytest.raises(TypeError, match="one entry per child"):
        multi.update_connector_output(ConnectorOutput(worker_meta=RecWorkerMeta(owner="a")))


def test_request_finished_delays_if_any_child_delays_and_merges_params() -> None:
    multi, _ = build(S, child("a", params={"x": 1}), child("b", delay_free=True, params={"y": 2}))
    assert multi.request_finished(request(), [1, 2]) == (True, {"x": 1, "y": 2})


def test_plain_request_finishes_with_false_none() -> None:
    multi, _ = build(S, child("a"), child("b"))
    assert multi.request_finished(request(), [1]) == (False, None)


def test_params_key_clash_raises_naming_both_children() -> None:
    multi, _ = build(S, child("a", params={"k": 1}), child("b", params={"k": 2}))
    with pytest.raises(ValueError, match="'k'.*both"):
        multi.request_finished(request(), [1])


def test_two_delaying_children_ship_one_extra_async_save() -> None:
    multi, _ = build(
        S, child("a", delay_free=True), child("b", delay_free=True), child("c", delay_free=True)
    )
    multi.request_finished(request("r9"), [1])
    meta = multi.build_connector_meta(SchedulerStep(step_id=1))
    assert meta.extra_async_saves == {"r9": 2}
    # Shipped once, then reset.
    assert multi.build_connector_meta(SchedulerStep(step_id=2)).extra_async_saves == {}


def test_single_delaying_child_ships_no_extra_count() -> None:
    multi, _ = build(S, child("a", delay_free=True), child("b"))
    multi.request_finished(request("r9"), [1])
    assert multi.build_connector_meta(SchedulerStep(step_id=1)).extra_async_saves == {}


def test_requests_loading_async_are_hidden_from_other_children_until_received() -> None:
    multi, (_loader, _store) = build(S, child("nixl", match=8, load_async=True), child("cpu"))
    req = request("r1", 12)
    multi.get_num_new_matched_tokens(req, 0)
    multi.update_state_after_alloc(req, ([1, 2, 3],), 8)
    sched = ScheduledRequest(req, ([1, 2, 3],), num_computed_tokens=8, num_scheduled_tokens=4)
    meta = multi.build_connector_meta(SchedulerStep(step_id=1, scheduled=(sched,)))
    assert meta.metadata[0].scheduled == ["r1"]
    assert meta.metadata[1].scheduled == []
    multi.update_connector_output(ConnectorOutput(finished_recving=frozenset({"r1"})))
    meta = multi.build_connector_meta(SchedulerStep(step_id=2, scheduled=(sched,)))
    assert meta.metadata[1].scheduled == ["r1"]


def test_stats_are_grouped_per_child_name() -> None:
    multi, _ = build(S, child("a"), {"kv_connector": "NoOpConnector"})
    stats = multi.get_kv_connector_stats()
    assert isinstance(stats, MultiKVConnectorStats)
    assert set(stats.per_connector) == {"Recording"}
    assert stats.per_connector["Recording"].data["calls"] == 0


def test_worker_stats_reach_each_child_by_name() -> None:
    multi, (a,) = build(S, child("a"))
    stats = MultiKVConnectorStats(per_connector={"Recording": KVConnectorStats(data={"n": 3})})
    multi.update_connector_output(ConnectorOutput(stats=stats))
    assert a.calls[-1][1].stats.data == {"n": 3}


def test_shutdown_reaches_every_child_even_if_one_raises() -> None:
    multi, (a, b, c) = build(S, child("a"), child("b", fail_shutdown=True), child("c"))
    with pytest.raises(RuntimeError, match="b failed"):
        multi.shutdown()
    assert all(x.calls[-1] == ("shutdown", None) for x in (a, b, c))


def test_engine_id_is_propagated_to_children() -> None:
    _multi, children = build(S, child("a"), {**child("b"), "engine_id": "own"})
    assert [c.config.engine_id for c in children] == ["engine-A", "own"]
    assert [c.config.kv_role for c in children] == ["kv_both", "kv_both"]


def test_hma_multi_group_requires_every_child_to_support_it() -> None:
    with pytest.raises(ConfigError, match=r"connectors\[1\].*Recording does not support hybrid"):
        build(S, child("a", hma=True), child("b"), num_groups=2)
    multi, _ = build(S, child("a", hma=True), child("b", hma=True), num_groups=2)
    assert multi is not None


def test_hma_every_child_sees_every_group() -> None:
    multi, (a, b) = build(
        S, child("a", hma=True), child("b", hma=True, delay_free=True), num_groups=2
    )
    req = request()
    multi.get_num_new_matched_tokens(req, 0)
    multi.update_state_after_alloc(req, ([1, 2], [7]), 0)
    assert a.calls[-1] == b.calls[-1] == ("alloc", ("r1", ([1, 2], [7]), 0))
    assert multi.request_finished_all_groups(req, ([1, 2], [7])) == (True, None)
    assert a.calls[-1] == ("finished_all_groups", ("r1", ([1, 2], [7])))
    assert b.calls[-1] == ("finished_all_groups", ("r1", ([1, 2], [7])))


def test_single_group_all_groups_call_reaches_non_hma_children() -> None:
    multi, (a, b) = build(S, child("a", hma=True), child("b"))
    multi.request_finished_all_groups(request(), ([3, 4],))
    assert a.calls[-1][0] == "finished_all_groups"
    assert b.calls[-1] == ("finished", ("r1", [3, 4]))


def test_children_must_agree_on_layout() -> None:
    with pytest.raises(ConfigError, match="layouts disagree"):
        build(S, child("a", layout="kv_first"), child("b", layout="blocks_first"))
    with pytest.raises(ConfigError, match="needs KV layout 'kv_first'"):
        build(S, child("a", layout="kv_first"))


def test_bad_children_config_names_the_key() -> None:
    from multi_helpers import multi_config

    from kvbridge.connector.factory import create_connector

    with pytest.raises(ConfigError, match=r"connectors\[0\]\.kv_role"):
        create_connector(multi_config({"kv_connector": "NoOpConnector", "kv_role": "x"}), S, spec())
    with pytest.raises(ConfigError, match="non-empty list"):
        create_connector(multi_config(), S, spec())
