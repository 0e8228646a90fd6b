"""kvbridge: move paged KV cache blocks between GPU, pinned CPU memory and other engines.

What an engine embedding kvbridge needs is importable from here (README, "Embed kvbridge in
your engine"). Every name but the config's is imported on first use, so ``import kvbridge``
stays light and never imports torch.
"""

# ruff: noqa: F401  (the TYPE_CHECKING imports below are what ``__getattr__`` serves)

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kvbridge.config import ConfigError, TransferConfig

__version__ = "0.1.0"

# name -> module that defines it; imported on first access.
_LAZY: dict[str, str] = {
    # the contract: roles, halves, metadata, what crosses between them
    **dict.fromkeys(
        (
            "ConnectorOutput",
            "KVConnectorBase",
            "KVConnectorHandshakeMetadata",
            "KVConnectorMetadata",
            "KVConnectorRole",
            "KVConnectorScheduler",
            "KVConnectorWorker",
            "KVConnectorWorkerMetadata",
            "SupportsHMA",
        ),
        "kvbridge.connector.base",
    ),
    **dict.fromkeys(
        (
            "BlockIds",
            "BlockRemoved",
            "BlockStored",
            "FinishedRequest",
            "IntegrityError",
            "KVCacheGroupSpec",
            "KVCacheLayout",
            "KVCacheSpec",
            "MatchResult",
            "RequestView",
            "ScheduledRequest",
            "SchedulerStep",
            "SimpleRequest",
        ),
        "kvbridge.connector.types",
    ),
    **dict.fromkeys(
        ("create_connector", "register_connector", "registered_connectors"),
        "kvbridge.connector.factory",
    ),
    **dict.fromkeys(("KVConnectorStats", "MultiKVConnectorStats"), "kvbridge.connector.stats"),
    # metadata across processes
    **dict.fromkeys(
        ("MetadataCodecError", "decode_metadata", "encode_metadata"), "kvbridge.connector.codec"
    ),
    **dict.fromkeys(("decode_output", "encode_output"), "kvbridge.kit.wire"),
    # the engine kit
    **dict.fromkeys(
        (
            "Admission",
            "ConnectorContractError",
            "Finished",
            "LoadOutcome",
            "TransferReport",
            "TransferTracker",
        ),
        "kvbridge.kit.transfers",
    ),
    "BlockHasher": "kvbridge.kit.hashing",
    "run_worker_step": "kvbridge.kit.worker_step",
    "ConnectorDriver": "kvbridge.kit.driver",
    **dict.fromkeys(
        ("SupportsRequestState", "has_request_state", "loading_child"), "kvbridge.kit.queries"
    ),
    # test doubles
    "FakeNixlWrapper": "kvbridge.nixl.fake",
    "FakeFabric": "kvbridge.nixl.fake_fabric",
}

__all__ = ["ConfigError", "TransferConfig", "__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvbridge' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:
    from kvbridge.connector.base import (
        ConnectorOutput,
        KVConnectorBase,
        KVConnectorHandshakeMetadata,
        KVConnectorMetadata,
        KVConnectorRole,
        KVConnectorScheduler,
        KVConnectorWorker,
        KVConnectorWorkerMetadata,
        SupportsHMA,
    )
    from kvbridge.connector.codec import MetadataCodecError, decode_metadata, encode_metadata
    from kvbridge.connector.factory import (
        create_connector,
        register_connector,
        registered_connectors,
    )
    from kvbridge.connector.stats import KVConnectorStats, MultiKVConnectorStats
    from kvbridge.connector.types import (
        BlockIds,
        BlockRemoved,
        BlockStored,
        FinishedRequest,
        IntegrityError,
        KVCacheGroupSpec,
        KVCacheLayout,
        KVCacheSpec,
        MatchResult,
        RequestView,
        ScheduledRequest,
        SchedulerStep,
        SimpleRequest,
    )
    from kvbridge.kit.driver import ConnectorDriver
    from kvbridge.kit.hashing import BlockHasher
    from kvbridge.kit.queries import SupportsRequestState, has_request_state, loading_child
    from kvbridge.kit.transfers import (
        Admission,
        ConnectorContractError,
        Finished,
        LoadOutcome,
        TransferReport,
        TransferTracker,
    )
    from kvbridge.kit.wire import decode_output, encode_output
    from kvbridge.kit.worker_step import run_worker_step
    from kvbridge.nixl.fake import FakeNixlWrapper
    from kvbridge.nixl.fake_fabric import FakeFabric
