"""TransferConfig: the typed, validated form of a vLLM-style ``--kv-transfer-config``."""

from __future__ import annotations

import difflib
import json
import logging
import uuid
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

logger = logging.getLogger(__name__)

KVRole = Literal["kv_producer", "kv_consumer", "kv_both"]
LoadFailurePolicy = Literal["recompute", "fail"]

KV_ROLES: tuple[str, ...] = ("kv_producer", "kv_consumer", "kv_both")
LOAD_FAILURE_POLICIES: tuple[str, ...] = ("recompute", "fail")

# Keys vLLM accepts that kvbridge reads but does not act on (kept so a vLLM config works verbatim).
_VLLM_PASSTHROUGH = (
    "kv_buffer_size",
    "kv_rank",
    "kv_parallel_size",
    "kv_ip",
    "kv_port",
    "enable_permute_local_kv",
)
# old name -> new name; old names keep working with a DeprecationWarning.
_RENAMED_KEYS: dict[str, str] = {"kv_connector_extra_configs": "kv_connector_extra_config"}


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the key and the fix."""


def check_load_failure_policy(value: object) -> None:
    """``ConfigError`` unless ``value`` is one of ``LOAD_FAILURE_POLICIES``."""
    if value not in LOAD_FAILURE_POLICIES:
        raise ConfigError(
            f"kv_load_failure_policy: {value!r} is not one of {', '.join(LOAD_FAILURE_POLICIES)}"
        )


@dataclass(frozen=True)
class TransferConfig:
    """Which connector to build and how; mirrors vLLM's KVTransferConfig keys."""

    kv_connector: str
    kv_role: KVRole = "kv_both"
    engine_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    kv_connector_extra_config: dict[str, Any] = field(default_factory=dict)
    kv_connector_module_path: str | None = None
    kv_load_failure_policy: LoadFailurePolicy = "recompute"
    kv_buffer_device: str = "cuda"
    kv_buffer_size: float = 1e9
    kv_rank: int | None = None
    kv_parallel_size: int = 1
    kv_ip: str = "127.0.0.1"
    kv_port: int = 14579
    enable_permute_local_kv: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.kv_connector, str) or not self.kv_connector:
            raise ConfigError(
                "kv_connector: must be a non-empty connector name, e.g. 'NixlConnector'"
            )
        if self.kv_role not in KV_ROLES:
            raise ConfigError(f"kv_role: {self.kv_role!r} is not one of {', '.join(KV_ROLES)}")
        if not isinstance(self.engine_id, str) or not self.engine_id:
            raise ConfigError("engine_id: must be a non-empty string")
        if not isinstance(self.kv_connector_extra_config, dict):
            raise ConfigError(
                "kv_connector_extra_config: must be a dict (JSON object), got "
                f"{type(self.kv_connector_extra_config).__name__}"
            )
        check_load_failure_policy(self.kv_load_failure_policy)
        if self.kv_connector_module_path is not None and not isinstance(
            self.kv_connector_module_path, str
        ):
            raise ConfigError("kv_connector_module_path: must be a dotted module path string")
        if self.kv_buffer_device not in ("cuda", "cpu"):
            raise ConfigError(
                f"kv_buffer_device: {self.kv_buffer_device!r} is not one of 'cuda', 'cpu'"
            )

    @property
    def is_producer(self) -> bool:
        return self.kv_role in ("kv_producer", "kv_both")

    @property
    def is_consumer(self) -> bool:
        return self.kv_role in ("kv_consumer", "kv_both")

    def extra(self, key: str, default: Any = None) -> Any:
        """One value of ``kv_connector_extra_config``."""
        return self.kv_connector_extra_config.get(key, default)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, parent: TransferConfig | None = None
    ) -> TransferConfig:
        """Build from a vLLM ``--kv-transfer-config`` dict; unknown keys raise ``ConfigError``.

        The connector's ``check_config`` then validates ``kv_connector_extra_config`` (a
        MultiConnector's: every child's), so a misspelled key fails here, naming its path.
        With ``parent``, a missing ``engine_id`` is inherited (MultiConnector children).
        """
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"kv-transfer-config: must be a JSON object, got {type(data).__name__}"
            )
        values = apply_renamed_keys(dict(data), _RENAMED_KEYS, prefix="")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"{unknown[0]}: unknown kv-transfer-config key;{did_you_mean(unknown[0], known)} "
                f"known keys: {', '.join(sorted(known))}"
            )
        if "kv_connector" not in values:
            raise ConfigError("kv_connector: required (the connector's registered name)")
        if parent is not None and values.get("engine_id") is None:
            values["engine_id"] = parent.engine_id
        if values.get("engine_id") is None:
            values.pop("engine_id", None)
        config = cls(**values)
        from kvbridge.connector.factory import get_connector_class  # it imports this module

        get_connector_class(config).check_config(config)
        return config

    @classmethod
    def from_json(cls, text: str) -> TransferConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"kv-transfer-config: invalid JSON ({e})") from e
        return cls.from_dict(data)


def apply_renamed_keys(
    values: dict[str, Any], renamed: Mapping[str, str], *, prefix: str
) -> dict[str, Any]:
    """Move deprecated keys (old -> new) to their new names, warning once per key.

    Giving both names is a ``ConfigError``; ``prefix`` is prepended to key names in messages.
    """
    for old, new in renamed.items():
        if old not in values:
            continue
        warnings.warn(
            f"config key {prefix}{old} is deprecated; use {new!r}", DeprecationWarning, stacklevel=3
        )
        if new in values:
            raise ConfigError(f"{prefix}{old}: given together with its new name {new!r}; keep one")
        values[new] = values.pop(old)
    return values


def check_extra_keys(
    config: TransferConfig | Mapping[str, Any],
    allowed: Mapping[str, type | tuple[type, ...]],
    *,
    where: str,
    path: str = "kv_connector_extra_config",
) -> dict[str, Any]:
    """Validate ``kv_connector_extra_config`` (or a mapping found at ``path``) against
    ``allowed`` (key -> accepted types).

    Returns the dict; raises ``ConfigError`` naming the first unknown or ill-typed key.
    """
    extra = dict(config.kv_connector_extra_config if isinstance(config, TransferConfig) else config)
    for key, value in extra.items():
        if key not in allowed:
            raise ConfigError(
                f"{path}.{key}: unknown key for {where};{did_you_mean(key, allowed)} "
                f"known keys: {', '.join(sorted(allowed)) or '(none)'}"
            )
        types = allowed[key]
        if value is not None and not isinstance(value, types):
            want = (
                types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
            )
            raise ConfigError(f"{path}.{key}: expected {want}, got {type(value).__name__}")
        if isinstance(value, bool) and not _accepts_bool(types):
            raise ConfigError(f"{path}.{key}: expected a number, got bool")
    return extra


def did_you_mean(key: str, known: Iterable[str]) -> str:
    """`` did you mean 'x'?`` for the known key closest to a misspelled ``key``, else ``""``."""
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" did you mean {close[0]!r}?" if close else ""


def _accepts_bool(types: type | tuple[type, ...]) -> bool:
    return bool in (types if isinstance(types, tuple) else (types,))
