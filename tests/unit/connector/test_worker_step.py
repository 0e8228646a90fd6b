"""run_worker_step: the worker-side hook order of one step, and cleanup on errors."""

from __future__ import annotations

import pytest
from multi_helpers import build, child

from kvbridge.connector.base import KVConnectorRole
from kvbridge.connector.multi import MultiConnectorMetadata
from kvbridge.kit.worker_step import run_worker_step


def _meta(children) -> MultiConnectorMetadata:  # type: ignore[no-untyped-def]
    from support.recording import RecMeta

    return MultiConnectorMetadata(
        metadata=tuple(RecMeta(owner=c.name, step_id=0, scheduled=[]) for c in children)
    )


def test_hooks_run_in_contract_order_and_output_collects_results() -> None:
    multi, (a,) = build(KVConnectorRole.WORKER, child("a", worker_meta=True))
    a.done_recving.add("r1")
    a.load_errors.add(7)
    out = run_worker_step(multi, _meta([a]), frozenset(), lambda: a.calls.append(("fwd", None)))
    assert [c[0] for c in a.calls] == ["bind", "start_load", "fwd", "wait_save"]
    assert out.finished_recving == frozenset({"r1"})
    assert out.invalid_block_ids == frozenset({7})
    assert out.worker_meta is not None


def test_metadata_is_cleared_when_the_forward_raises() -> None:
    multi, (a,) = build(KVConnectorRole.WORKER, child("a"))

    def boom() -> None:
        raise RuntimeError("forward failed")

    with pytest.raises(RuntimeError, match="forward failed"):
        run_worker_step(multi, _meta([a]), frozenset(), boom)
    run_worker_step(multi, _meta([a]))  # binding again works: the first bind was cleared
