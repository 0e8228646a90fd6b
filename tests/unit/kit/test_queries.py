"""has_request_state and loading_child: the public questions about one request's state."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import kvbridge
from kvbridge import KVConnectorRole, ScheduledRequest, SimpleRequest, TransferConfig

BS = 4
SPEC = kvbridge.KVCacheSpec(
    block_size=BS, num_blocks=16, num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32"
)
CPU = {"kv_connector": "SimpleCPUOffloadConnector", "kv_connector_extra_config": {}}
NOOP = {"kv_connector": "NoOpConnector"}
RECORDING = {
    "kv_connector": "Recording",
    "kv_connector_module_path": "support.recording",
    "kv_connector_extra_config": {"name": "rec"},
}


def _multi(*children: dict[str, Any]) -> TransferConfig:
    cpu_blocks = {"num_cpu_blocks": 8}
    kids = [{**c, "kv_connector_extra_config": cpu_blocks} if c is CPU else c for c in children]
    return TransferConfig.from_dict(
        {"kv_connector": "MultiConnector", "kv_connector_extra_config": {"connectors": kids}}
    )


def _request(rid: str, tokens: list[int]) -> SimpleRequest:
    return SimpleRequest(rid, tokens, kvbridge.BlockHasher(BS).hash_tokens(tokens))


def test_a_cpu_load_is_visible_until_it_lands_and_the_request_finishes() -> None:
    cfg = _multi(NOOP, CPU)
    sched = kvbridge.create_connector(cfg, KVConnectorRole.SCHEDULER, SPEC)
    worker = kvbridge.create_connector(cfg, KVConnectorRole.WORKER, SPEC)
    shape = (SPEC.num_blocks, 2, BS, SPEC.num_kv_heads, SPEC.head_dim)
    caches = {f"layers.{i}": torch.randn(shape) for i in range(SPEC.num_layers)}
    worker.register_kv_caches(caches)
    drv = kvbridge.ConnectorDriver(sched, worker, kv_caches=caches)
    tokens = list(range(9))
    a = _request("a", tokens)
    assert not kvbridge.has_request_state(sched, "a")
    sched.update_state_after_alloc(a, ([0, 1, 2],), 0)
    drv.step(ScheduledRequest(a, ([0, 1, 2],), 0, 9))
    a.num_computed_tokens = 9
    drv.step(ScheduledRequest(a, ([0, 1, 2],), 9, 1))  # stores the confirmed blocks
    assert sched.request_finished(a, [0, 1, 2]).delay_free is False
    drv.run_until(lambda o: not kvbridge.has_request_state(sched, "a"))
    b = _request("b", [*tokens, 5])
    assert sched.get_num_new_matched_tokens(b, 0) == (8, True)
    assert kvbridge.loading_child(sched, "b") == "SimpleCPUOffloadConnector"
    sched.update_state_after_alloc(b, ([4, 5, 6],), 8)
    assert kvbridge.has_request_state(sched, "b")
    drv.run_until(lambda o: "b" in o.finished_recving)
    assert kvbridge.has_request_state(sched, "b")  # the loader stays known until the finish
    assert sched.request_finished(b, [4, 5, 6]).delay_free is False
    assert not kvbridge.has_request_state(sched, "b")
    assert kvbridge.loading_child(sched, "b") is None
    worker.shutdown()
    sched.shutdown()


def test_a_request_nothing_matched_has_no_loading_child() -> None:
    sched = kvbridge.create_connector(_multi(NOOP, CPU), KVConnectorRole.SCHEDULER, SPEC)
    assert sched.get_num_new_matched_tokens(_request("x", list(range(9))), 0) == (0, False)
    assert kvbridge.loading_child(sched, "x") is None
    assert not kvbridge.has_request_state(sched, "x")


def test_connectors_that_cannot_answer_are_type_errors() -> None:
    noop = kvbridge.create_connector(
        TransferConfig(kv_connector="NoOpConnector"), KVConnectorRole.SCHEDULER, SPEC
    )
    assert not kvbridge.has_request_state(noop, "x")
    with pytest.raises(TypeError, match="not a MultiConnector"):
        kvbridge.loading_child(noop, "x")
    rec = kvbridge.create_connector(
        TransferConfig.from_dict(RECORDING), KVConnectorRole.SCHEDULER, SPEC
    )
    with pytest.raises(TypeError, match="RecScheduler cannot say"):
        kvbridge.has_request_state(rec, "x")
    multi = kvbridge.create_connector(_multi(NOOP, RECORDING), KVConnectorRole.SCHEDULER, SPEC)
    with pytest.raises(TypeError, match="Recording cannot say"):
        kvbridge.has_request_state(multi, "x")
