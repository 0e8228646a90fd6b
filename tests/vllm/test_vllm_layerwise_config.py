"""What vLLM asks kvbridge's connectors about layerwise CPU-tier loads before it builds them:
piecewise CUDA graphs (a full graph's replay would skip ``wait_for_layer_load``), and a refusal
on hybrid caches (vLLM cannot roll back a failed in-step load there)."""

from __future__ import annotations

from pathlib import Path

import pytest
from scheduler_harness import make_kv_cache_config, make_vllm_config
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from kvbridge.config import ConfigError
from kvbridge.vllm import KVBridgeCPUOffloadConnector, KVBridgeMultiConnector

pytestmark = pytest.mark.vllm


def _multi(mode: str) -> dict:
    cpu = {"cpu_bytes_to_use": 2 << 20, "load_mode": mode}
    return {
        "connectors": [
            {"kv_connector": "SimpleCPUOffloadConnector", "kv_connector_extra_config": cpu}
        ]
    }


def test_layerwise_asks_vllm_for_piecewise_cuda_graphs() -> None:
    assert KVBridgeCPUOffloadConnector.requires_piecewise_for_cudagraph({"load_mode": "layerwise"})
    assert not KVBridgeCPUOffloadConnector.requires_piecewise_for_cudagraph({"load_mode": "async"})
    assert not KVBridgeCPUOffloadConnector.requires_piecewise_for_cudagraph({})
    assert KVBridgeMultiConnector.requires_piecewise_for_cudagraph(_multi("layerwise"))
    assert not KVBridgeMultiConnector.requires_piecewise_for_cudagraph(_multi("async"))
    assert not KVBridgeMultiConnector.requires_piecewise_for_cudagraph({"connectors": "x"})


@pytest.mark.parametrize("hybrid", [False, True])
def test_layerwise_on_a_hybrid_cache_is_refused_with_the_fix(
    tiny_llama: Path, hybrid: bool
) -> None:
    config = make_vllm_config(tiny_llama, "layerwise-config", "fake")
    assert config.kv_transfer_config is not None
    config.kv_transfer_config.kv_connector_extra_config = _multi("layerwise")
    kv_cache_config = make_kv_cache_config(config, hybrid)
    if not hybrid:
        KVBridgeMultiConnector(config, KVConnectorRole.WORKER, kv_cache_config)
        return
    with pytest.raises(ConfigError, match="layerwise' needs a single KV cache group.*'async'"):
        KVBridgeMultiConnector(config, KVConnectorRole.WORKER, kv_cache_config)
