"""MultiConnector worker-side rules (SPEC §2)."""

from __future__ import annotations

import pytest
import torch
from multi_helpers import build, child

from kvbridge.connector.base import EmptyMetadata, KVConnectorRole
from kvbridge.connector.multi import MultiConnectorMetadata, MultiWorkerMetadata

W = KVConnectorRole.WORKER


def bind(multi, children, extra=None) -> None:  # type: ignore[no-untyped-def]
    from support.recording import RecMeta

    parts = tuple(RecMeta(owner=c.name, step_id=0, scheduled=[]) for c in children)
    multi.bind_connector_metadata(
        MultiConnectorMetadata(metadata=parts, extra_async_saves=extra or {})
    )


def test_every_worker_hook_is_forwarded_to_every_child() -> None:
    multi, children = build(W, child("a"), child("b"))
    multi.register_kv_caches({"layers.0": torch.zeros(2)})
    bind(multi, children)
    multi.start_load_kv()
    multi.wait_for_layer_load("layers.0")
    multi.save_kv_layer("layers.0", torch.zeros(2))
    multi.wait_for_save()
    multi.clear_connector_metadata()
    for c in children:
        names = [call[0] for call in c.calls]
        assert names == ["register", "bind", "start_load", "wait_layer", "save_layer", "wait_save"]


def test_child_i_is_bound_to_part_i() -> None:
    multi, children = build(W, child("a"), child("b"), child("c"))
    bind(multi, children)
    assert [c.bound[-1].owner for c in children] == ["a", "b", "c"]


def test_wrong_metadata_shape_is_rejected() -> None:
    multi, _ = build(W, child("a"), child("b"))
    with pytest.raises(TypeError, match="one entry per child"):
        multi.bind_connector_metadata(EmptyMetadata())


def test_two_delaying_children_report_once_after_both() -> None:
    multi, (a, b) = build(W, child("a"), child("b"))
    bind(multi, (a, b), extra={"r1": 1})
    a.done_sending.add("r1")
    assert multi.get_finished(frozenset({"r1"})).sending == frozenset()
    multi.clear_connector_metadata()
    bind(multi, (a, b))
    assert multi.get_finished(frozenset()).sending == frozenset()
    b.done_sending.add("r1")
    assert multi.get_finished(frozenset({"r1"})).sending == frozenset({"r1"})
    # Never reported twice, and the count is gone.
    assert multi._extra_async_saves == {}


def test_both_children_finishing_in_the_same_step_report_once() -> None:
    multi, (a, b, c) = build(W, child("a"), child("b"), child("c"))
    bind(multi, (a, b, c), extra={"r1": 2})
    a.done_sending.add("r1")
    b.done_sending.add("r1")
    assert multi.get_finished(frozenset({"r1"})).sending == frozenset()
    c.done_sending.add("r1")
    assert multi.get_finished(frozenset({"r1"})).sending == frozenset({"r1"})


def test_single_delaying_child_reports_immediately() -> None:
    multi, (a, b) = build(W, child("a"), child("b"))
    bind(multi, (a, b))
    b.done_sending.add("r2")
    assert multi.get_finished(frozenset({"r2"})).sending == frozenset({"r2"})


def test_finished_recving_and_load_errors_are_unions() -> None:
    multi, (a, b) = build(W, child("a"), child("b"))
    a.done_recving.add("x")
    b.done_recving.add("y")
    a.load_errors |= {1, 2}
    b.load_errors |= {2, 9}
    assert multi.get_finished(frozenset()).recving == frozenset({"x", "y"})
    assert multi.get_block_ids_with_load_errors() == {1, 2, 9}
    a.failed_recving.add("x")
    assert multi.take_failed_recving() == {"x"} and multi.take_failed_recving() == set()


def test_worker_metadata_goes_back_per_child() -> None:
    multi, _ = build(W, child("a"), child("b", worker_meta=True))
    meta = multi.build_connector_worker_meta()
    assert isinstance(meta, MultiWorkerMetadata)
    assert meta.metadata[0] is None and meta.metadata[1].owner == "b"
    none_multi, _ = build(W, child("a"), child("b"))
    assert none_multi.build_connector_worker_meta() is None


def test_handshake_metadata_is_the_first_non_none() -> None:
    multi, _ = build(W, child("a"), child("b", handshake=True), child("c", handshake=True))
    assert multi.get_handshake_metadata().owner == "b"


def test_worker_shutdown_reaches_all_children() -> None:
    multi, children = build(W, child("a", fail_shutdown=True), child("b"))
    with pytest.raises(RuntimeError, match="a failed"):
        multi.shutdown()
    assert all(c.calls[-1] == ("shutdown", None) for c in children)
