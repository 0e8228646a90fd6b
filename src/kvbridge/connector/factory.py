"""Connector registry (lazy imports) and the factory that builds either half from a config."""

from __future__ import annotations

import importlib
import logging
from typing import Literal, overload

from kvbridge.config import ConfigError, TransferConfig
from kvbridge.connector.base import (
    KVConnectorBase,
    KVConnectorRole,
    KVConnectorScheduler,
    KVConnectorWorker,
)
from kvbridge.connector.types import KVCacheLayout, KVCacheSpec

logger = logging.getLogger(__name__)

# name -> "module:ClassName"; imported only when that connector is built.
_REGISTRY: dict[str, str] = {
    "NixlConnector": "kvbridge.nixl.connector:NixlConnector",
    "SimpleCPUOffloadConnector": "kvbridge.offload.connector:SimpleCPUOffloadConnector",
    "MultiConnector": "kvbridge.connector.multi:MultiConnector",
    "NoOpConnector": "kvbridge.connector.noop:NoOpConnector",
}


def register_connector(name: str, target: str) -> None:
    """Register ``name`` -> ``"module:Class"``; re-registering a name is an error."""
    if name in _REGISTRY and _REGISTRY[name] != target:
        raise ValueError(f"connector {name!r} is already registered as {_REGISTRY[name]}")
    if ":" not in target:
        raise ValueError(f"connector target {target!r}: expected 'package.module:ClassName'")
    _REGISTRY[name] = target


def registered_connectors() -> list[str]:
    return sorted(_REGISTRY)


def get_connector_class(config: TransferConfig) -> type[KVConnectorBase]:
    """Resolve ``config.kv_connector`` (through ``kv_connector_module_path`` if given)."""
    if config.kv_connector_module_path:
        module_name, class_name = config.kv_connector_module_path, config.kv_connector
    elif config.kv_connector in _REGISTRY:
        module_name, class_name = _REGISTRY[config.kv_connector].split(":")
    else:
        raise ConfigError(
            f"kv_connector: unknown connector {config.kv_connector!r}; registered: "
            f"{', '.join(registered_connectors())} (or set kv_connector_module_path)"
        )
    try:
        module = importlib.import_module(module_name)
    except (ImportError, TypeError, ValueError) as e:  # Type/ValueError: relative or empty name
        raise ConfigError(
            f"kv_connector_module_path: cannot import {module_name!r} for connector "
            f"{config.kv_connector!r}: {e}"
        ) from e
    # Only the class the config names, and only a connector type.
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, KVConnectorBase)):
        raise ConfigError(
            f"kv_connector: {module_name}.{class_name} is not a kvbridge connector "
            "(a subclass of kvbridge.connector.base.KVConnectorBase)"
        )
    return cls


@overload
def create_connector(
    config: TransferConfig, role: Literal[KVConnectorRole.SCHEDULER], spec: KVCacheSpec
) -> KVConnectorScheduler: ...
@overload
def create_connector(
    config: TransferConfig, role: Literal[KVConnectorRole.WORKER], spec: KVCacheSpec
) -> KVConnectorWorker: ...
def create_connector(
    config: TransferConfig, role: KVConnectorRole, spec: KVCacheSpec
) -> KVConnectorScheduler | KVConnectorWorker:
    """Build the ``role`` half of the connector ``config`` names, checked against ``spec``."""
    cls = get_connector_class(config)
    cls.check_cache_spec(config, spec)
    logger.info("building %s (%s) for engine %s", config.kv_connector, role.value, config.engine_id)
    if role is KVConnectorRole.SCHEDULER:
        return cls.build_scheduler(config, spec)
    if role is KVConnectorRole.WORKER:
        return cls.build_worker(config, spec)
    raise ConfigError(f"role: {role!r} is not a KVConnectorRole")


def layouts_agree(names: list[str], layouts: list[KVCacheLayout | None]) -> KVCacheLayout | None:
    """The one layout all non-None requirements agree on; a clear error if they differ."""
    wanted = {(n, lay) for n, lay in zip(names, layouts) if lay is not None}
    distinct = {lay for _, lay in wanted}
    if len(distinct) > 1:
        detail = ", ".join(f"{n} needs {lay.value}" for n, lay in sorted(wanted, key=str))
        raise ConfigError(f"kv_connector_extra_config.connectors: KV layouts disagree ({detail})")
    return next(iter(distinct), None)
