"""Builders shared by the MultiConnector tests."""

from __future__ import annotations

from typing import Any

from kvbridge.config import TransferConfig
from kvbridge.connector.base import KVConnectorRole
from kvbridge.connector.factory import create_connector
from kvbridge.connector.types import KVCacheGroupSpec, KVCacheSpec, SimpleRequest
from support import recording

MODULE = "support.recording"


def child(name: str, hma: bool = False, **extra: Any) -> dict[str, Any]:
    return {
        "kv_connector": "RecordingHMA" if hma else "Recording",
        "kv_connector_module_path": MODULE,
        "kv_connector_extra_config": {"name": name, **extra},
    }


def spec(num_groups: int = 1) -> KVCacheSpec:
    groups = tuple(
        KVCacheGroupSpec(f"g{i}", (f"layers.{i}",), "full" if i == 0 else "sliding_window", 8)
        for i in range(num_groups)
    )
    return KVCacheSpec(
        block_size=4,
        num_blocks=32,
        num_layers=max(2, num_groups),
        num_kv_heads=2,
        head_dim=8,
        dtype="float32",
        groups=groups,
    )


def multi_config(*children: dict[str, Any], engine_id: str = "engine-A") -> TransferConfig:
    return TransferConfig.from_dict(
        {
            "kv_connector": "MultiConnector",
            "kv_role": "kv_both",
            "engine_id": engine_id,
            "kv_connector_extra_config": {"connectors": list(children)},
        }
    )


def build(role: KVConnectorRole, *children: dict[str, Any], num_groups: int = 1):  # type: ignore[no-untyped-def]
    recording.INSTANCES.clear()
    half = create_connector(multi_config(*children), role, spec(num_groups))
    return half, list(recording.INSTANCES)


def request(req_id: str = "r1", n: int = 10) -> SimpleRequest:
    return SimpleRequest(request_id=req_id, prompt_token_ids=list(range(n)))
