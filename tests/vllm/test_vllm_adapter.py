"""The vLLM adapter's translations, one rule each (no engine: vLLM's own types, kvbridge's)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from vllm.distributed.kv_events import BlockRemoved as VllmRemoved
from vllm.distributed.kv_events import BlockStored as VllmStored
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvbridge.config import ConfigError
from kvbridge.connector.base import KVConnectorScheduler
from kvbridge.connector.stats import KVConnectorStats, MultiKVConnectorStats
from kvbridge.connector.types import (
    BlockRemoved,
    BlockStored,
    KVCacheLayout,
    KVCacheSpec,
    MatchResult,
    Medium,
)
from kvbridge.vllm.metrics import KVBridgePromMetrics
from kvbridge.vllm.scheduler import SchedulerAdapter
from kvbridge.vllm.spec import _layout
from kvbridge.vllm.wire import KVBridgeStats

pytestmark = pytest.mark.vllm

SPEC = KVCacheSpec(
    block_size=32, num_blocks=8, num_layers=2, num_kv_heads=2, head_dim=4, dtype="bfloat16"
)


class _Half(KVConnectorScheduler):
    """A scheduler half that answers from fixed values."""

    def __init__(self, events: list[Any], loader: str | None = None) -> None:
        super().__init__(None, SPEC)  # type: ignore[arg-type]
        self.events, self.loader = events, loader

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> MatchResult:
        return MatchResult(0, True)

    def update_state_after_alloc(self, request: Any, block_ids: Any, n: int) -> None: ...

    def build_connector_meta(self, step: Any) -> Any: ...

    def take_events(self) -> list[Any]:
        return self.events

    def loading_child(self, request_id: str) -> str | None:
        return self.loader


class _Req:
    request_id = "r"


def test_events_keep_hashes_medium_and_group() -> None:
    half = _Half(
        [
            BlockStored((b"a", b"b"), Medium.CPU, 32, group_idx=1),
            BlockRemoved((b"a",), Medium.CPU),
        ]
    )
    stored, removed = list(SchedulerAdapter("SimpleCPUOffloadConnector", half, SPEC).take_events())
    assert isinstance(stored, VllmStored) and isinstance(removed, VllmRemoved)
    assert (stored.block_hashes, stored.medium, stored.block_size, stored.group_idx) == (
        [b"a", b"b"], "CPU", 32, 1
    )  # fmt: skip
    assert (removed.block_hashes, removed.medium, removed.group_idx) == ([b"a"], "CPU", None)


def test_no_match_is_never_async_and_hits_are_named_by_the_loading_child() -> None:
    adapter = SchedulerAdapter("MultiConnector", _Half([], loader="NixlConnector"), SPEC)
    assert adapter.get_num_new_matched_tokens(_Req(), 0) == (0, False)  # type: ignore[arg-type]
    assert adapter.hit_sources(_Req(), 64) == {CacheHitSource.P2P: 64}  # type: ignore[arg-type]
    adapter = SchedulerAdapter(
        "MultiConnector", _Half([], loader="SimpleCPUOffloadConnector"), SPEC
    )
    assert adapter.hit_sources(_Req(), 32) == {CacheHitSource.HOST: 32}  # type: ignore[arg-type]
    assert adapter.hit_sources(_Req(), 0) == {}  # type: ignore[arg-type]


def test_stats_aggregate_reduce_and_come_back_as_kvbridge_stats() -> None:
    a = KVBridgeStats.wrap("NixlConnector", KVConnectorStats(data={"n": 1, "t": [0.5]}))
    multi = MultiKVConnectorStats()
    multi.add("NixlConnector", KVConnectorStats(data={"n": 2, "t": [1.5]}))
    multi.add("SimpleCPUOffloadConnector", KVConnectorStats(data={"hits": 32}))
    b = KVBridgeStats.wrap("MultiConnector", multi)
    assert a is not None and b is not None
    merged = a.aggregate(b)
    assert merged.reduce() == {
        "NixlConnector.n": 3.0,
        "NixlConnector.t.count": 2.0,
        "NixlConnector.t.mean": 1.0,
        "NixlConnector.t.max": 1.5,
        "SimpleCPUOffloadConnector.hits": 32.0,
    }
    unwrapped = merged.unwrap("MultiConnector")
    assert isinstance(unwrapped, MultiKVConnectorStats)
    assert unwrapped.per_connector["SimpleCPUOffloadConnector"].data == {"hits": 32}
    own = KVBridgeStats.wrap("NixlConnector", KVConnectorStats(data={"n": 1}))
    assert own is not None and isinstance(own.unwrap("NixlConnector"), KVConnectorStats)
    assert KVBridgeStats.wrap("x", KVConnectorStats()) is None


def test_prometheus_counters_and_histograms_per_connector() -> None:
    metrics = KVBridgePromMetrics(
        SimpleNamespace(kv_transfer_config=None),  # type: ignore[arg-type]
        {Gauge: Gauge, Counter: Counter, Histogram: Histogram},
        ["model_name", "engine"],
        {0: ["m", "0"]},
    )
    data = {"SimpleCPUOffloadConnector": {"unit_hits": 32, "unit_copy_s": [0.1, 0.2]}}
    metrics.observe(data, 0)
    metrics.observe(data, 0)
    labels = {"model_name": "m", "engine": "0", "connector": "SimpleCPUOffloadConnector"}
    assert REGISTRY.get_sample_value("kvbridge:unit_hits_total", labels) == 64
    assert REGISTRY.get_sample_value("kvbridge:unit_copy_s_count", labels) == 4


@pytest.mark.parametrize(
    ("name", "layout"),
    [("LBHNC", KVCacheLayout.VLLM_LBHNC), ("NHD", KVCacheLayout.VLLM_LBNHC)],
)
def test_vllm_layout_names_map_to_kvbridge_layouts(name: str, layout: KVCacheLayout) -> None:
    assert _layout(_Cfg(None), _Cfg(name)) is layout  # type: ignore[arg-type]


def test_a_layout_that_splits_blocks_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match="VLLM_KV_CACHE_LAYOUT=LBHNC"):
        _layout(_Cfg(None), _Cfg("LHBNC"))  # type: ignore[arg-type]


class _Cfg:
    """Stands for vLLM's cache and KV cache configs: both carry ``kv_cache_layout``."""

    def __init__(self, layout: str | None) -> None:
        self.kv_cache_layout = layout
        self.cache_config = self


def test_metadata_crosses_vllms_pickling_as_codec_bytes() -> None:
    import pickle

    from kvbridge.connector.multi import MultiConnectorMetadata
    from kvbridge.offload.metadata import CPUOffloadMetadata, TransferJob
    from kvbridge.vllm.wire import KVBridgeMetadata

    job = TransferJob(job_id=1, req_id="a", gpu_block_ids=[1], cpu_block_ids=[2])
    meta = KVBridgeMetadata(MultiConnectorMetadata(metadata=(CPUOffloadMetadata(loads=[job]),)))
    payload = pickle.dumps(meta)
    assert b"TransferJob" not in payload  # kvbridge's classes travel as codec names, not pickles
    back = pickle.loads(payload)
    assert back == meta and type(back.inner.metadata[0]) is CPUOffloadMetadata
