"""kvbridge: move paged KV cache blocks between GPU, pinned CPU memory and other engines.

What an engine embedding kvbridge needs is importable from here (README, "Embed kvbridge in
your engine"). Every name but the config's is imported on first use, so ``import kvbridge``
stays light and never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kvbridge.config import ConfigError, TransferConfig

__version__ = "0.1.0"

# module -> the names it defines that kvbridge exports; each imported on first access.
_EXPORTS: dict[str, str] = {
    "kvbridge.connector.base": (
        "ConnectorOutput KVConnectorBase KVConnectorHandshakeMetadata "
        "KVConnectorMetadata KVConnectorRole KVConnectorScheduler KVConnectorWorker "
        "KVConnectorWorkerMetadata SupportsHMA"
    ),
    "kvbridge.connector.types": (
        "BlockIds BlockRemoved BlockStored FinishedRequest HandoverToken IntegrityError "
        "KVCacheGroupSpec KVCacheLayout KVCacheSpec MatchResult RequestView "
        "ScheduledRequest SchedulerStep SimpleRequest SupportsHandover"
    ),
    "kvbridge.connector.factory": "create_connector register_connector registered_connectors",
    "kvbridge.connector.stats": "KVConnectorStats MultiKVConnectorStats",
    "kvbridge.connector.codec": "MetadataCodecError decode_metadata encode_metadata",
    "kvbridge.kit.wire": "decode_output encode_output",
    "kvbridge.kit.transfers": (
        "Admission ConnectorContractError Finished LoadOutcome TransferReport TransferTracker"
    ),
    "kvbridge.kit.hashing": "BlockHasher",
    "kvbridge.kit.worker_step": "run_worker_step",
    "kvbridge.kit.driver": "ConnectorDriver",
    "kvbridge.kit.queries": "SupportsRequestState has_request_state loading_child",
    "kvbridge.nixl.fake": "FakeNixlWrapper",
    "kvbridge.nixl.fake_fabric": "FakeFabric",
}
_LAZY = {name: module for module, names in _EXPORTS.items() for name in names.split()}

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


if TYPE_CHECKING:  # `X as X`: explicit re-exports for type checkers
    from kvbridge.connector.base import ConnectorOutput as ConnectorOutput
    from kvbridge.connector.base import KVConnectorBase as KVConnectorBase
    from kvbridge.connector.base import KVConnectorHandshakeMetadata as KVConnectorHandshakeMetadata
    from kvbridge.connector.base import KVConnectorMetadata as KVConnectorMetadata
    from kvbridge.connector.base import KVConnectorRole as KVConnectorRole
    from kvbridge.connector.base import KVConnectorScheduler as KVConnectorScheduler
    from kvbridge.connector.base import KVConnectorWorker as KVConnectorWorker
    from kvbridge.connector.base import KVConnectorWorkerMetadata as KVConnectorWorkerMetadata
    from kvbridge.connector.base import SupportsHMA as SupportsHMA
    from kvbridge.connector.codec import MetadataCodecError as MetadataCodecError
    from kvbridge.connector.codec import decode_metadata as decode_metadata
    from kvbridge.connector.codec import encode_metadata as encode_metadata
    from kvbridge.connector.factory import create_connector as create_connector
    from kvbridge.connector.factory import register_connector as register_connector
    from kvbridge.connector.factory import registered_connectors as registered_connectors
    from kvbridge.connector.stats import KVConnectorStats as KVConnectorStats
    from kvbridge.connector.stats import MultiKVConnectorStats as MultiKVConnectorStats
    from kvbridge.connector.types import BlockIds as BlockIds
    from kvbridge.connector.types import BlockRemoved as BlockRemoved
    from kvbridge.connector.types import BlockStored as BlockStored
    from kvbridge.connector.types import FinishedRequest as FinishedRequest
    from kvbridge.connector.types import HandoverToken as HandoverToken
    from kvbridge.connector.types import IntegrityError as IntegrityError
    from kvbridge.connector.types import KVCacheGroupSpec as KVCacheGroupSpec
    from kvbridge.connector.types import KVCacheLayout as KVCacheLayout
    from kvbridge.connector.types import KVCacheSpec as KVCacheSpec
    from kvbridge.connector.types import MatchResult as MatchResult
    from kvbridge.connector.types import RequestView as RequestView
    from kvbridge.connector.types import ScheduledRequest as ScheduledRequest
    from kvbridge.connector.types import SchedulerStep as SchedulerStep
    from kvbridge.connector.types import SimpleRequest as SimpleRequest
    from kvbridge.connector.types import SupportsHandover as SupportsHandover
    from kvbridge.kit.driver import ConnectorDriver as ConnectorDriver
    from kvbridge.kit.hashing import BlockHasher as BlockHasher
    from kvbridge.kit.queries import SupportsRequestState as SupportsRequestState
    from kvbridge.kit.queries import has_request_state as has_request_state
    from kvbridge.kit.queries import loading_child as loading_child
    from kvbridge.kit.transfers import Admission as Admission
    from kvbridge.kit.transfers import ConnectorContractError as ConnectorContractError
    from kvbridge.kit.transfers import Finished as Finished
    from kvbridge.kit.transfers import LoadOutcome as LoadOutcome
    from kvbridge.kit.transfers import TransferReport as TransferReport
    from kvbridge.kit.transfers import TransferTracker as TransferTracker
    from kvbridge.kit.wire import decode_output as decode_output
    from kvbridge.kit.wire import encode_output as encode_output
    from kvbridge.kit.worker_step import run_worker_step as run_worker_step
    from kvbridge.nixl.fake import FakeNixlWrapper as FakeNixlWrapper
    from kvbridge.nixl.fake_fabric import FakeFabric as FakeFabric
