"""NixlSettings: the NixlConnector's ``kv_connector_extra_config``, parsed once and validated."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvbridge.config import ConfigError, TransferConfig, apply_renamed_keys, check_extra_keys

# key -> accepted types
_ALLOWED: dict[str, type | tuple[type, ...]] = {
    "kv_lease_duration_s": (int, float),
    "heartbeat_interval_s": (int, float),
    "abort_timeout_s": (int, float),
    "transfer_timeout_s": (int, float),
    "side_channel_host": str,
    "side_channel_port": int,
    "backends": list,
    "nixl_wrapper": (str, Callable),  # type: ignore[dict-item]
    "merge_contiguous_blocks": bool,
    "num_threads": int,
    "max_handshake_bytes": int,
    "enforce_handshake_compat": bool,
    "slow_transfer_s": (int, float),
}
# old (vLLM-style) name -> new name; old names keep working with a DeprecationWarning.
_ALIASES: dict[str, str] = {
    "abort_request_timeout": "abort_timeout_s",
    "nixl_side_channel_host": "side_channel_host",
    "nixl_side_channel_port": "side_channel_port",
    "kv_lease_duration": "kv_lease_duration_s",
}
WRAPPER_NAMES = ("nixl", "fake")


@dataclass(frozen=True)
class NixlSettings:
    """Lease, timeout, side-channel and transport settings shared by both halves."""

    kv_lease_duration_s: float = 30.0
    heartbeat_interval_s: float = 5.0
    abort_timeout_s: float = 480.0
    transfer_timeout_s: float = 30.0
    side_channel_host: str = "127.0.0.1"
    side_channel_port: int = 14579
    backends: tuple[str, ...] = ("UCX",)
    nixl_wrapper: str | Callable[..., Any] = "nixl"
    merge_contiguous_blocks: bool = True
    num_threads: int = 2
    max_handshake_bytes: int = 64 << 20
    enforce_handshake_compat: bool = True
    slow_transfer_s: float = 1.0

    @classmethod
    def from_config(cls, config: TransferConfig) -> NixlSettings:
        """Validate ``config.kv_connector_extra_config``; errors name the key."""
        allowed = dict(_ALLOWED)
        allowed.update({old: _ALLOWED[new] for old, new in _ALIASES.items()})
        extra = apply_renamed_keys(
            dict(check_extra_keys(config, allowed, where="NixlConnector")),
            _ALIASES,
            prefix="kv_connector_extra_config.",
        )
        values: dict[str, Any] = {k: v for k, v in extra.items() if v is not None}
        values.setdefault("side_channel_host", config.kv_ip)
        values.setdefault("side_channel_port", config.kv_port)
        if "backends" in values:
            backends = values["backends"]
            if not backends or not all(isinstance(b, str) and b for b in backends):
                raise ConfigError(
                    "kv_connector_extra_config.backends: expected a non-empty list of backend "
                    "names, e.g. ['UCX']"
                )
            values["backends"] = tuple(backends)
        for key in (k for k, t in _ALLOWED.items() if t == (int, float)):
            if key in values:
                values[key] = float(values[key])
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        for key in ("kv_lease_duration_s", "heartbeat_interval_s", "abort_timeout_s"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"kv_connector_extra_config.{key}: must be > 0")
        for key in ("transfer_timeout_s", "slow_transfer_s"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"kv_connector_extra_config.{key}: must be > 0")
        if self.heartbeat_interval_s >= self.kv_lease_duration_s:
            raise ConfigError(
                "kv_connector_extra_config.heartbeat_interval_s: must be below "
                f"kv_lease_duration_s ({self.kv_lease_duration_s}) or leases lapse between beats"
            )
        if self.kv_lease_duration_s > self.abort_timeout_s:
            raise ConfigError(
                "kv_connector_extra_config.kv_lease_duration_s: must not exceed abort_timeout_s "
                f"({self.abort_timeout_s}), the hard cap on any hold"
            )
        if not 0 <= self.side_channel_port <= 65535:
            raise ConfigError("kv_connector_extra_config.side_channel_port: must be in 0..65535")
        if self.num_threads < 1:
            raise ConfigError("kv_connector_extra_config.num_threads: must be >= 1")
        if self.max_handshake_bytes < 1024:
            raise ConfigError("kv_connector_extra_config.max_handshake_bytes: must be >= 1024")
        if isinstance(self.nixl_wrapper, str) and self.nixl_wrapper not in WRAPPER_NAMES:
            raise ConfigError(
                f"kv_connector_extra_config.nixl_wrapper: {self.nixl_wrapper!r} is not one of "
                f"{', '.join(WRAPPER_NAMES)} (or a callable returning a NixlTransport)"
            )
