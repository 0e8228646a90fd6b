"""The ConnectorOutput wire codec, and ConnectorDriver stepping real halves through it."""

from __future__ import annotations

import pytest
import torch

from kvbridge.config import TransferConfig
from kvbridge.connector.base import ConnectorOutput, KVConnectorRole
from kvbridge.connector.codec import MetadataCodecError
from kvbridge.connector.factory import create_connector
from kvbridge.connector.multi import MultiConnectorMetadata, MultiWorkerMetadata
from kvbridge.connector.stats import KVConnectorStats, MultiKVConnectorStats
from kvbridge.connector.types import KVCacheSpec, ScheduledRequest, SimpleRequest
from kvbridge.kit.driver import ConnectorDriver
from kvbridge.kit.hashing import BlockHasher
from kvbridge.kit.wire import decode_output, encode_output
from kvbridge.nixl.metadata import NixlWorkerMetadata
from kvbridge.offload.metadata import CPUOffloadMetadata, CPUOffloadWorkerMetadata

BS = 4
SPEC = KVCacheSpec(
    block_size=BS, num_blocks=16, num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32"
)


@pytest.mark.parametrize(
    "output",
    [
        ConnectorOutput(),
        ConnectorOutput(
            finished_sending=frozenset({"a", "b"}),
            finished_recving=frozenset({"c"}),
            invalid_block_ids=frozenset({3, 9}),
            worker_meta=CPUOffloadWorkerMetadata(completed_stores=[1, 2]),
            stats=KVConnectorStats(data={"n": 2, "t": [0.5, 1.5]}),
        ),
        ConnectorOutput(
            worker_meta=MultiWorkerMetadata(
                metadata=(NixlWorkerMetadata(), None, CPUOffloadWorkerMetadata(failed_loads=[4]))
            ),
            stats=MultiKVConnectorStats(
                per_connector={"NixlConnector": KVConnectorStats(data={"x": 1})}
            ),
        ),
    ],
    ids=["empty", "one-connector", "multi"],
)
def test_connector_output_round_trips_with_its_types(output: ConnectorOutput) -> None:
    back = decode_output(encode_output(output))
    assert back == output
    assert type(back.worker_meta) is type(output.worker_meta)
    assert type(back.stats) is type(output.stats)
    if isinstance(output.worker_meta, MultiWorkerMetadata):
        assert isinstance(back.worker_meta, MultiWorkerMetadata)
        assert [type(m) for m in back.worker_meta.metadata] == [
            type(m) for m in output.worker_meta.metadata
        ]


def test_a_malformed_output_is_a_codec_error() -> None:
    with pytest.raises(MetadataCodecError, match="connector output"):
        decode_output(b"\x93garbage")
    with pytest.raises(MetadataCodecError, match="expected KVConnectorWorkerMetadata"):
        decode_output(encode_output(ConnectorOutput(worker_meta=CPUOffloadMetadata())))  # type: ignore[arg-type]


def _multi_cpu_config() -> TransferConfig:
    cpu = {
        "kv_connector": "SimpleCPUOffloadConnector",
        "kv_connector_extra_config": {"num_cpu_blocks": 8},
    }
    return TransferConfig(
        kv_connector="MultiConnector",
        kv_connector_extra_config={"connectors": [cpu]},
    )


def test_the_driver_stores_and_reloads_through_the_wire() -> None:
    """MultiConnector(CPU offload): a prompt stored to the CPU tier comes back byte for byte
    into other blocks, with metadata and outputs crossing the codec every step."""
    cfg = _multi_cpu_config()
    sched = create_connector(cfg, KVConnectorRole.SCHEDULER, SPEC)
    worker = create_connector(cfg, KVConnectorRole.WORKER, SPEC)
    shape = (SPEC.num_blocks, 2, BS, SPEC.num_kv_heads, SPEC.head_dim)
    gen = torch.Generator().manual_seed(0)
    caches = {f"layers.{i}": torch.randn(shape, generator=gen) for i in range(2)}
    worker.register_kv_caches(caches)
    drv = ConnectorDriver(sched, worker, kv_caches=caches, wire=True)
    tokens = list(range(13))
    a = SimpleRequest("a", tokens, BlockHasher(BS).hash_tokens(tokens))
    sched.update_state_after_alloc(a, ([0, 1, 2, 3],), 0)
    drv.step(ScheduledRequest(a, ([0, 1, 2, 3],), 0, 13))
    a.num_computed_tokens = 13
    drv.run_until(
        lambda o: (
            isinstance(o.worker_meta, MultiWorkerMetadata)
            and any(m is not None and m.completed_stores for m in o.worker_meta.metadata)
        ),  # type: ignore[attr-defined]
        ScheduledRequest(a, ([0, 1, 2, 3],), 13, 1),
    )
    assert all(type(m) is MultiConnectorMetadata for m in drv.metas)
    expected = [t[[0, 1, 2]].clone() for t in caches.values()]
    assert sched.request_finished(a, [0, 1, 2, 3]).delay_free is False
    for t in caches.values():
        t.normal_()
    b = SimpleRequest("b", [*tokens, 99], BlockHasher(BS).hash_tokens([*tokens, 99]))
    assert sched.get_num_new_matched_tokens(b, 0) == (12, True)
    sched.update_state_after_alloc(b, ([5, 6, 7, 8],), 12)
    drv.run_until(lambda o: "b" in o.finished_recving)
    assert drv.outputs[-1].invalid_block_ids == frozenset()
    for got, want in zip([t[[5, 6, 7]] for t in caches.values()], expected):
        assert torch.equal(got, want)
    worker.shutdown()
    sched.shutdown()


def test_run_until_gives_up_at_its_deadline() -> None:
    cfg = TransferConfig(kv_connector="NoOpConnector")
    drv = ConnectorDriver(create_connector(cfg, KVConnectorRole.SCHEDULER, SPEC))
    with pytest.raises(TimeoutError, match="not done"):
        drv.run_until(lambda o: False, timeout_s=0.05)
    assert drv.step_id >= 2 and len(drv.outputs) == drv.step_id
