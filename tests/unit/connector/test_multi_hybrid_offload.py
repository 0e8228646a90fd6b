"""MultiConnector(NixlConnector, SimpleCPUOffloadConnector) on a full + sliding-window cache.

vLLM's own test runs exactly this pair on hybrid groups; SPEC §2 lets a composite run on a
multi-group cache only if every child supports HMA.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvbridge.config import ConfigError, TransferConfig
from kvbridge.connector.base import ConnectorOutput, KVConnectorRole
from kvbridge.connector.factory import create_connector
from kvbridge.connector.multi import MultiConnector
from kvbridge.connector.types import (
    KVCacheGroupSpec,
    KVCacheSpec,
    ScheduledRequest,
    SchedulerStep,
    SimpleRequest,
)
from kvbridge.kit.worker_step import run_worker_step
from kvbridge.offload.scheduler import CPUOffloadScheduler
from support.hashes import block_hashes

BS = 4
SPEC = KVCacheSpec(
    block_size=BS,
    num_blocks=16,
    num_layers=3,
    num_kv_heads=2,
    head_dim=8,
    dtype="float32",
    groups=(
        KVCacheGroupSpec("full", ("layers.0", "layers.2")),
        KVCacheGroupSpec("swa", ("layers.1",), "sliding_window", 9),
    ),
)
NIXL: dict[str, Any] = {
    "kv_connector": "NixlConnector",
    "kv_connector_extra_config": {"nixl_wrapper": "fake", "side_channel_port": 0},
}
CPU: dict[str, Any] = {
    "kv_connector": "SimpleCPUOffloadConnector",
    "kv_connector_extra_config": {"num_cpu_blocks": 16},
}
NO_HMA: dict[str, Any] = {
    "kv_connector": "Recording",
    "kv_connector_module_path": "support.recording",
    "kv_connector_extra_config": {"name": "plain"},
}


def multi(*children: dict[str, Any]) -> TransferConfig:
    return TransferConfig.from_dict(
        {
            "kv_connector": "MultiConnector",
            "kv_role": "kv_both",
            "engine_id": "hybrid",
            "kv_connector_extra_config": {"connectors": list(children)},
        }
    )


def test_nixl_and_cpu_offload_build_on_full_plus_sliding_window() -> None:
    cfg = multi(NIXL, CPU)
    assert MultiConnector.supports_hma(cfg)
    for role in KVConnectorRole:
        create_connector(cfg, role, SPEC).shutdown()


def test_a_child_without_hma_is_still_refused_on_the_same_cache() -> None:
    cfg = multi(NIXL, NO_HMA)
    for role in KVConnectorRole:
        with pytest.raises(ConfigError, match=r"connectors\[1\]: Recording does not support"):
            create_connector(cfg, role, SPEC)


def test_the_cpu_child_stores_and_loads_every_group_inside_the_composite() -> None:
    cfg = multi(NIXL, CPU)
    sched = create_connector(cfg, KVConnectorRole.SCHEDULER, SPEC)
    worker = create_connector(cfg, KVConnectorRole.WORKER, SPEC)
    offload = sched.children[1]  # type: ignore[attr-defined]
    assert isinstance(offload, CPUOffloadScheduler)
    gen = torch.Generator().manual_seed(3)
    caches = {f"layers.{i}": torch.randn((16, 2, BS, 2, 8), generator=gen) for i in range(3)}
    worker.register_kv_caches(caches)
    step_id = 0

    def step(*scheduled: ScheduledRequest) -> ConnectorOutput:
        nonlocal step_id
        meta = sched.build_connector_meta(SchedulerStep(step_id, scheduled))
        step_id += 1
        out = run_worker_step(worker, meta)
        sched.update_connector_output(out)
        offload.check_integrity()
        return out

    try:
        a = SimpleRequest("a", list(range(9)), block_hashes=block_hashes(list(range(9)), BS))
        blocks = ([1, 2, 3], [4, 5, 6])
        step(ScheduledRequest(a, blocks, 0, 9))
        step(ScheduledRequest(a, blocks, 9, 1))
        a.num_computed_tokens = 10
        assert sched.request_finished_all_groups(a, blocks) == (False, None)
        want = [caches[n][[1, 2]].clone() for n in ("layers.0", "layers.2")]
        want.append(caches["layers.1"][[4, 5]].clone())
        for t in caches.values():
            t.zero_()
        b = SimpleRequest("b", list(range(10)), block_hashes=block_hashes(list(range(10)), BS))
        assert sched.get_num_new_matched_tokens(b, 0) == (2 * BS, True)
        sched.update_state_after_alloc(b, ([7, 8, 9], [10, 11, 12]), 2 * BS)
        assert step().finished_recving == {"b"}
        got = [caches[n][[7, 8]] for n in ("layers.0", "layers.2")]
        got.append(caches["layers.1"][[10, 11]])
        assert all(torch.equal(g, w) for g, w in zip(got, want))
        assert offload.num_tracked_requests == 1  # b, until it finishes
    finally:
        worker.shutdown()
        sched.shutdown()
