"""Connector gauges: each half reports its own, MultiConnector labels its children's."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch
from multi_helpers import multi_config, spec

from kvbridge.config import TransferConfig
from kvbridge.connector.base import KVConnectorRole
from kvbridge.connector.factory import create_connector
from kvbridge.connector.gauges import (
    MultiKVConnectorGauges,
    child_labels,
    connector_gauges,
    label_gauges,
    nonzero,
)
from kvbridge.connector.multi_scheduler import MultiScheduler
from kvbridge.connector.multi_worker import MultiWorker
from kvbridge.connector.noop import NoOpConnector, NoOpScheduler
from kvbridge.connector.types import SchedulerStep, SimpleRequest

NIXL_EXTRA = {"nixl_wrapper": "fake", "side_channel_port": 5600}
NIXL = {"kv_connector": "NixlConnector", "kv_connector_extra_config": NIXL_EXTRA}
OFFLOAD = {
    "kv_connector": "SimpleCPUOffloadConnector",
    "kv_connector_extra_config": {"num_cpu_blocks": 8},
}
GAUGED = {"kv_connector": "GaugedConnector", "kv_connector_module_path": __name__}
NIXL_WORKER_KEYS = {
    "num_live_leases",
    "nixl_num_inflight_xfer_handles",
    "nixl_num_inflight_dlist_handles",
    "nixl_num_inflight_loads",
    "nixl_num_remote_agents",
}


class GaugedScheduler(NoOpScheduler):
    """Runs in the scheduler; reports one gauge, ``value`` from its extra config."""

    def get_kv_connector_gauges(self) -> dict[str, int]:
        return {"things_held": int(self.config.extra("value", 0))}


class GaugedConnector(NoOpConnector):
    scheduler_cls = GaugedScheduler


def _scheduler(*children: dict[str, Any]) -> MultiScheduler:
    cfg = replace(multi_config(*children), kv_role="kv_producer")
    half = create_connector(cfg, KVConnectorRole.SCHEDULER, spec())
    assert isinstance(half, MultiScheduler)
    return half


def _worker(*children: dict[str, Any]) -> MultiWorker:
    cfg = replace(multi_config(*children), kv_role="kv_producer")
    half = create_connector(cfg, KVConnectorRole.WORKER, spec())
    assert isinstance(half, MultiWorker)
    return half


def _producer_request(rid: str, n: int) -> SimpleRequest:
    return SimpleRequest(rid, list(range(n)), kv_transfer_params={"do_remote_decode": True},
                         num_computed_tokens=n, finish_reason="length")  # fmt: skip


def test_children_are_labelled_by_name_and_report_their_own_keys() -> None:
    sched = _scheduler(NIXL, OFFLOAD)
    idle = sched.get_kv_connector_gauges()
    assert idle == MultiKVConnectorGauges(per_connector={
        "NixlConnector": {"num_blocks_held_for_remote_decode": 0},
        "SimpleCPUOffloadConnector": {"num_pinned_cpu_blocks": 0, "num_storing_cpu_blocks": 0},
    })  # fmt: skip
    assert sched.request_finished(_producer_request("p-1", 10), [4, 5, 6]).delay_free
    sched.build_connector_meta(SchedulerStep(step_id=0))
    held = sched.get_kv_connector_gauges().per_connector
    assert held["NixlConnector"] == {"num_blocks_held_for_remote_decode": 3}
    assert nonzero(label_gauges(sched.get_kv_connector_gauges(), "MultiConnector")) == [
        "NixlConnector num_blocks_held_for_remote_decode=3"
    ]
    sched.shutdown()


def test_worker_half_reports_nixl_handles_under_the_childs_label() -> None:
    s = spec()
    shape = (s.num_blocks, 2, s.block_size, s.num_kv_heads, s.head_dim)
    caches = {name: torch.zeros(shape) for g in s.groups for name in g.layer_names}
    worker = _worker(NIXL, OFFLOAD)
    try:
        worker.register_kv_caches(caches)
        gauges = worker.get_kv_connector_gauges().per_connector
        assert gauges["SimpleCPUOffloadConnector"] == {"kv_offload_num_inflight_copies": 0}
        assert set(gauges["NixlConnector"]) == NIXL_WORKER_KEYS
        assert all(v == 0 for v in gauges["NixlConnector"].values())
    finally:
        worker.shutdown()


def test_both_halves_merge_under_one_label_and_sum() -> None:
    sched = _scheduler(GAUGED, OFFLOAD)
    other = create_connector(
        TransferConfig.from_dict({**GAUGED, "kv_connector_extra_config": {"value": 2}}),
        KVConnectorRole.SCHEDULER,
        spec(),
    )
    merged = connector_gauges("MultiConnector", sched, None, other)
    assert merged == {
        "GaugedConnector": {"things_held": 0},
        "SimpleCPUOffloadConnector": {"num_pinned_cpu_blocks": 0, "num_storing_cpu_blocks": 0},
        "MultiConnector": {"things_held": 2},  # a single connector is labelled by its name
    }


def test_children_of_one_name_get_their_index_and_nested_composites_a_path() -> None:
    assert child_labels(["A", "B", "A"]) == ["A[0]", "B", "A[2]"]
    first = {**GAUGED, "kv_connector_extra_config": {"value": 1}}
    second = {**GAUGED, "kv_connector_extra_config": {"value": 5}}
    nested = {"kv_connector": "MultiConnector",
              "kv_connector_extra_config": {"connectors": [second]}}  # fmt: skip
    sched = _scheduler(first, second, nested)
    assert sched.get_kv_connector_gauges().per_connector == {
        "GaugedConnector[0]": {"things_held": 1},
        "GaugedConnector[1]": {"things_held": 5},
        "MultiConnector/GaugedConnector": {"things_held": 5},
    }


@pytest.mark.parametrize("standing", [False, True])
def test_nonzero_names_leaks_and_skips_standing_gauges_unless_asked(standing: bool) -> None:
    gauges = {"NixlConnector": {"num_live_leases": 0, "nixl_num_remote_agents": 1}}
    expected = ["NixlConnector nixl_num_remote_agents=1"] if standing else []
    assert nonzero(gauges, standing=standing) == expected
