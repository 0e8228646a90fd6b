"""NixlSettings: the NixlConnector's ``kv_connector_extra_config``, parsed once and validated."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvbridge.config import (
    ConfigError,
    TransferConfig,
    apply_renamed_keys,
    check_extra_keys,
)
from kvbridge.nixl.lease_board import DEFAULT_BOARD_SLOTS, board_size_error

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
    "fake_nixl": dict,
    "merge_contiguous_blocks": bool,
    "num_threads": int,
    "max_handshake_bytes": int,
    "enforce_handshake_compat": bool,
    "slow_transfer_s": (int, float),
    "progress_delay_us": int,
    "lease_board_slots": int,
    "notify_agent": bool,
}
# old (vLLM-style) name -> new name; old names keep working with a DeprecationWarning.
_ALIASES: dict[str, str] = {
    "abort_request_timeout": "abort_timeout_s",
    "nixl_side_channel_host": "side_channel_host",
    "nixl_side_channel_port": "side_channel_port",
    "kv_lease_duration": "kv_lease_duration_s",
}
WRAPPER_NAMES = ("nixl", "fake")
# FakeNixlWrapper's knobs settable from the config (``fake_nixl``) -> type; all >= 0
FAKE_KNOBS: dict[str, type] = {
    "cycles_before_xfer_done": int,
    "fail_next_xfers": int,
    "fail_xfers_on_post": bool,
}
DEFAULT_HEARTBEAT_S = 5.0
# NIXL's progress thread wakes this often when idle (us; 0: NIXL's own, a spinning thread).
# Measured on the 2-core CPU box (docs/benchmarks.md): 2.9 % of a core at 1 ms, 0.8 % at 5 ms.
DEFAULT_PROGRESS_DELAY_US = 5000
BEATS_PER_LEASE = 3  # a derived heartbeat renews a lease this many times per lease duration


@dataclass(frozen=True)
class NixlSettings:
    """Lease, timeout, side-channel and transport settings shared by both halves.

    ``kv_lease_duration_s`` is the producer's; the producer announces it at the handshake.
    ``heartbeat_interval_s`` is the consumer's; left unset it follows each producer's lease
    (``heartbeat_for``).
    """

    kv_lease_duration_s: float = 30.0
    heartbeat_interval_s: float | None = None  # None: derived from the producer's lease
    abort_timeout_s: float = 480.0
    transfer_timeout_s: float = 30.0
    side_channel_host: str = "127.0.0.1"
    side_channel_port: int = 14579
    backends: tuple[str, ...] = ("UCX",)
    nixl_wrapper: str | Callable[..., Any] = "nixl"
    fake_nixl: dict[str, Any] = field(default_factory=dict)  # knobs of FakeNixlWrapper
    merge_contiguous_blocks: bool = True
    num_threads: int = 2
    max_handshake_bytes: int = 64 << 20
    enforce_handshake_compat: bool = True
    slow_transfer_s: float = 1.0
    progress_delay_us: int = DEFAULT_PROGRESS_DELAY_US  # NIXL progress thread's idle wake-up
    # words on a producer's lease board (``lease_board``); 0: a producer publishes no board
    # and a consumer reads none (every READ then waits for the lease answer)
    lease_board_slots: int = DEFAULT_BOARD_SLOTS
    # a consumer sends its notifications through a second NIXL agent of its own, never on the
    # endpoint its READs use (``transport_factory.make_notifier``); False: through the one
    notify_agent: bool = True

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

    def heartbeat_for(self, producer_lease_s: float) -> float:
        """The consumer's heartbeat interval for a producer announcing ``producer_lease_s``
        (0: it did not say; this engine's own ``kv_lease_duration_s`` stands in): the configured
        one, or ``min(5 s, lease / 3)``. ``ValueError`` naming both keys when the configured
        interval does not beat within the producer's lease."""
        lease = producer_lease_s if producer_lease_s > 0 else self.kv_lease_duration_s
        beat = self.heartbeat_interval_s
        if beat is None:
            return min(DEFAULT_HEARTBEAT_S, lease / BEATS_PER_LEASE)
        if producer_lease_s > 0 and beat >= producer_lease_s:
            raise ValueError(
                f"kv_connector_extra_config.heartbeat_interval_s ({beat:g}) is not below the "
                f"producer's kv_lease_duration_s ({producer_lease_s:g}): its leases would lapse "
                "between heartbeats (leave heartbeat_interval_s unset to follow the producer)"
            )
        return beat

    def validate(self) -> None:
        for key in (
            "kv_lease_duration_s",
            "heartbeat_interval_s",
            "abort_timeout_s",
            "transfer_timeout_s",
            "slow_transfer_s",
        ):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"kv_connector_extra_config.{key}: must be > 0")
        beat = self.heartbeat_interval_s
        if beat is not None and beat >= self.kv_lease_duration_s:
            raise ConfigError(
                f"kv_connector_extra_config.heartbeat_interval_s: must be below "
                f"kv_lease_duration_s ({self.kv_lease_duration_s:g}) or leases lapse between "
                "beats (leave it unset to follow the producer's lease)"
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
        if self.progress_delay_us < 0:
            raise ConfigError(
                "kv_connector_extra_config.progress_delay_us: must be >= 0 (0: NIXL's default, "
                "a progress thread that spins a core)"
            )
        board_error = board_size_error(self.lease_board_slots)
        if board_error is not None:
            raise ConfigError(f"kv_connector_extra_config.lease_board_slots: {board_error}")
        if self.max_handshake_bytes < 1024:
            raise ConfigError("kv_connector_extra_config.max_handshake_bytes: must be >= 1024")
        if isinstance(self.nixl_wrapper, str) and self.nixl_wrapper not in WRAPPER_NAMES:
            raise ConfigError(
                f"kv_connector_extra_config.nixl_wrapper: {self.nixl_wrapper!r} is not one of "
                f"{', '.join(WRAPPER_NAMES)} (or a callable returning a NixlTransport)"
            )
        if self.fake_nixl and self.nixl_wrapper != "fake":
            raise ConfigError(
                "kv_connector_extra_config.fake_nixl: knobs of the fake transport; set "
                "nixl_wrapper: 'fake' too, or drop fake_nixl"
            )
        path = "kv_connector_extra_config.fake_nixl"
        knobs = check_extra_keys(self.fake_nixl, FAKE_KNOBS, where="FakeNixlWrapper", path=path)
        for knob, value in knobs.items():
            if value is None or value < 0:
                raise ConfigError(f"{path}.{knob}: must be >= 0, got {value!r}")
