"""ServeConfig: what ``kvbridge serve`` runs, from a YAML/JSON file and/or flags, validated."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from kvbridge.config import ConfigError, TransferConfig

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 1 << 20
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "float16", "bfloat16")

# key -> accepted types (bool is never accepted where an int is wanted).
_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "host": (str,),
    "port": (int,),
    "device": (str,),
    "dtype": (str,),
    "seed": (int,),
    "block_size": (int,),
    "num_gpu_blocks": (int,),
    "max_num_seqs": (int,),
    "max_num_batched_tokens": (int,),
    "enable_prefix_caching": (bool,),
    "enable_chunked_prefill": (bool,),
    "kv_transfer_config": (dict, TransferConfig),
    "served_model_name": (str,),
    "max_body_bytes": (int,),
}
# Keys passed to the engine's config when set (None = the engine's default).
ENGINE_KEYS = (
    "model",
    "device",
    "dtype",
    "seed",
    "block_size",
    "num_gpu_blocks",
    "max_num_seqs",
    "max_num_batched_tokens",
    "enable_prefix_caching",
    "enable_chunked_prefill",
)


@dataclass(frozen=True)
class ServeConfig:
    """Settings of one ``kvbridge serve`` process; ``None`` means "the engine's default"."""

    model: str = "tiny"
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "cpu"
    dtype: str | None = None
    seed: int = 0
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool | None = None
    enable_chunked_prefill: bool | None = None
    kv_transfer_config: TransferConfig | None = None
    served_model_name: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            want = _TYPES[f.name]
            if not isinstance(value, want) or (isinstance(value, bool) and bool not in want):
                names = " or ".join("object" if t is dict else t.__name__ for t in want)
                raise ConfigError(f"{f.name}: expected {names}, got {type(value).__name__}")
        if isinstance(self.kv_transfer_config, dict):
            object.__setattr__(
                self, "kv_transfer_config", TransferConfig.from_dict(self.kv_transfer_config)
            )
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port: {self.port} is not in 0..65535")
        if self.device.split(":")[0] not in DEVICES:
            raise ConfigError(f"device: {self.device!r} is not one of {', '.join(DEVICES)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        for key in ("block_size", "num_gpu_blocks", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"{key}: must be > 0, got {value}")
        if self.seed < 0:
            raise ConfigError(f"seed: must be >= 0, got {self.seed}")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"max_body_bytes: must be >= 1024, got {self.max_body_bytes}")

    @property
    def model_name(self) -> str:
        """The name reported in responses (``served_model_name`` or the model's)."""
        return self.served_model_name or Path(self.model).name or self.model

    def engine_kwargs(self) -> dict[str, Any]:
        """The engine config keys that are set, plus the transfer config."""
        out = {k: getattr(self, k) for k in ENGINE_KEYS if getattr(self, k) is not None}
        out["kv_transfer_config"] = self.kv_transfer_config
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "config") -> ServeConfig:
        """Build from a mapping; unknown keys raise ``ConfigError`` naming the key."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: must be a mapping of keys to values")
        known = {f.name for f in fields(cls)}
        normalised = {str(k).replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(normalised) - known)
        if unknown:
            raise ConfigError(
                f"{unknown[0]}: unknown key in {where}; known keys: {', '.join(sorted(known))}"
            )
        return cls(**normalised)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML (``.yaml``/``.yml``) or JSON file into a dict; errors name the file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"config file {p}: cannot read ({e.strerror})") from e
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {p}: invalid JSON ({e})") from e
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p}: invalid YAML ({e})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {p}: top level must be a mapping, got {type(data).__name__}"
        )
    return data


def load_serve_config(path: str | Path | None, overrides: Mapping[str, Any]) -> ServeConfig:
    """File values (if any), then non-None ``overrides`` on top, validated once."""
    base = read_config_file(path) if path is not None else {}
    merged = dict(base)
    for key, value in overrides.items():
        if value is not None:
            merged[key] = value
    if isinstance(merged.get("kv_transfer_config"), str):
        merged["kv_transfer_config"] = TransferConfig.from_json(merged["kv_transfer_config"])
    return ServeConfig.from_dict(merged, where=f"config file {path}" if path else "flags")


@dataclass(frozen=True)
class ProxyConfig:
    """Settings of one ``kvbridge proxy`` process."""

    prefill: tuple[str, ...] = ()
    decode: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8000
    timeout_s: float = 600.0
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    def __post_init__(self) -> None:
        for key in ("prefill", "decode"):
            value = getattr(self, key)
            if isinstance(value, str) or not isinstance(value, list | tuple):
                raise ConfigError(f"{key}: expected a list of server URLs")
            if not all(isinstance(u, str) and u for u in value):
                raise ConfigError(f"{key}: every entry must be a URL string")
            object.__setattr__(self, key, tuple(value))
        if not self.decode:
            raise ConfigError("decode: at least one decode server URL is required")
        if not isinstance(self.host, str):
            raise ConfigError(f"host: expected str, got {type(self.host).__name__}")
        for key in ("port", "max_body_bytes"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{key}: expected int, got {type(value).__name__}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port: {self.port} is not in 0..65535")
        t = self.timeout_s
        if isinstance(t, bool) or not isinstance(t, int | float) or t <= 0:
            raise ConfigError(f"timeout_s: must be a number > 0, got {t!r}")

    @classmethod
    def load(cls, path: str | Path | None, overrides: Mapping[str, Any]) -> ProxyConfig:
        """File values (if any), then non-None/non-empty ``overrides``; unknown keys named."""
        merged = read_config_file(path) if path is not None else {}
        merged = {str(k).replace("-", "_"): v for k, v in merged.items()}
        merged.update({k: v for k, v in overrides.items() if v not in (None, [], ())})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(merged) - known)
        if unknown:
            where = f"config file {path}" if path else "flags"
            raise ConfigError(
                f"{unknown[0]}: unknown key in {where}; known keys: {', '.join(sorted(known))}"
            )
        return cls(**merged)
