"""MultiConnector: composes an ordered list of child connectors (SPEC §2).

Rules (one test each in tests/unit/connector/test_multi_*.py):
- Load: first wins — the first child with a positive match loads; any ``None`` means ask again.
- The chosen child gets the real ``num_external_tokens``; every other child gets 0.
- Store: to all — every worker hook is forwarded to every child.
- Metadata travels as a tuple in child order, both directions; child i sees only part i.
- A request is reported in ``finished_sending`` once, after every child that delayed its free.
- kv_transfer_params are merged; a key given by two children is an error.
- ``finished_recving`` and load-error block ids are unions over the children.
- Hybrid (multi-group) caches only if every child supports HMA; children must agree on layout.
- Handshake metadata is the first child's that is not None; stats are grouped per child name.
- Gauges are reported per child, labelled by its name (``name[i]`` when two children share one).
- ``shutdown`` reaches every child even if one raises, then re-raises the first error.
- A request being loaded asynchronously by one child is hidden from the other children's
  store planning until it is reported in ``finished_recving``.
"""

from __future__ import annotations

from typing import Any

from kvbridge.config import ConfigError, TransferConfig
from kvbridge.connector.base import (
    KVConnectorBase,
    KVConnectorMetadata,
    KVConnectorScheduler,
    KVConnectorWorker,
    KVConnectorWorkerMetadata,
)
from kvbridge.connector.factory import get_connector_class, layouts_agree
from kvbridge.connector.types import KVCacheLayout, KVCacheSpec

_EXTRA_KEYS = ("connectors",)


class MultiConnectorMetadata(KVConnectorMetadata):
    """Per-step metadata of a MultiConnector: child i's metadata at index i.

    ``extra_async_saves``: request id -> how many *additional* children (beyond one) will
    report it in ``finished_sending``.
    """

    metadata: tuple[KVConnectorMetadata, ...]
    extra_async_saves: dict[str, int] = {}


class MultiWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker metadata of a MultiConnector: child i's (or None) at index i."""

    metadata: tuple[KVConnectorWorkerMetadata | None, ...]


def child_configs(config: TransferConfig) -> list[TransferConfig]:
    """Parse ``kv_connector_extra_config["connectors"]``; children inherit ``engine_id``."""
    extra = config.kv_connector_extra_config
    unknown = sorted(set(extra) - set(_EXTRA_KEYS))
    if unknown:
        raise ConfigError(
            f"kv_connector_extra_config.{unknown[0]}: unknown key for MultiConnector; "
            "known keys: connectors"
        )
    entries = extra.get("connectors")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(
            "kv_connector_extra_config.connectors: MultiConnector needs a non-empty list of "
            "child kv-transfer-config objects"
        )
    children: list[TransferConfig] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(
                f"kv_connector_extra_config.connectors[{i}]: expected an object, "
                f"got {type(entry).__name__}"
            )
        try:
            child = TransferConfig.from_dict(
                {"kv_role": config.kv_role, **entry},
                parent=config,
            )
        except ConfigError as e:
            raise ConfigError(f"kv_connector_extra_config.connectors[{i}].{e}") from e
        children.append(child)
    return children


def child_classes(config: TransferConfig) -> list[tuple[TransferConfig, type[KVConnectorBase]]]:
    return [(child, get_connector_class(child)) for child in child_configs(config)]


class MultiConnector(KVConnectorBase):
    """Composes child connectors: the first child that matches loads, every child stores."""

    @classmethod
    def check_config(cls, config: TransferConfig) -> None:
        child_configs(config)  # each child is parsed, so checked, by TransferConfig.from_dict

    @classmethod
    def supports_hma(cls, config: TransferConfig | None = None) -> bool:
        if config is None:
            return False
        return all(c.supports_hma(cfg) for cfg, c in child_classes(config))

    @classmethod
    def get_required_kv_layout(cls, config: TransferConfig | None = None) -> KVCacheLayout | None:
        if config is None:
            return None
        pairs = child_classes(config)
        return layouts_agree(
            [cfg.kv_connector for cfg, _ in pairs],
            [c.get_required_kv_layout(cfg) for cfg, c in pairs],
        )

    @classmethod
    def check_cache_spec(cls, config: TransferConfig, spec: KVCacheSpec) -> None:
        pairs = child_classes(config)
        cls.get_required_kv_layout(config)
        if spec.num_groups > 1:
            for i, (cfg, c) in enumerate(pairs):
                if not c.supports_hma(cfg):
                    raise ConfigError(
                        f"kv_connector_extra_config.connectors[{i}]: {cfg.kv_connector} does "
                        f"not support hybrid KV caches ({spec.num_groups} cache groups), so the "
                        "MultiConnector cannot run on this model; every child must support HMA"
                    )
        for i, (cfg, c) in enumerate(pairs):
            try:
                c.check_cache_spec(cfg, spec)
            except ConfigError as e:
                raise ConfigError(f"kv_connector_extra_config.connectors[{i}]: {e}") from e

    @classmethod
    def build_scheduler(
        cls, config: TransferConfig, cache_spec: KVCacheSpec
    ) -> KVConnectorScheduler:
        from kvbridge.connector.multi_scheduler import MultiScheduler

        return MultiScheduler(config, cache_spec)

    @classmethod
    def build_worker(cls, config: TransferConfig, cache_spec: KVCacheSpec) -> KVConnectorWorker:
        from kvbridge.connector.multi_worker import MultiWorker

        return MultiWorker(config, cache_spec)


def merge_transfer_params(
    parts: list[tuple[str, dict[str, Any] | None]],
) -> dict[str, Any] | None:
    """Merge children's kv_transfer_params; a key from two children raises ``ValueError``."""
    merged: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for name, params in parts:
        for key, value in (params or {}).items():
            if key in merged:
                raise ValueError(
                    f"kv_transfer_params key {key!r} is produced by both {owner[key]} and {name}; "
                    "a MultiConnector cannot merge them"
                )
            merged[key] = value
            owner[key] = name
    return merged or None
