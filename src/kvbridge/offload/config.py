"""Offload settings: ``kv_connector_extra_config`` of SimpleCPUOffloadConnector, parsed once.

The keys and their meaning are vLLM's SimpleCPUOffloadConnector's (``cpu_bytes_to_use``,
``cpu_bytes_to_use_per_rank``, ``lazy_offload``, ``lazy_offload_min_prefix_tokens``,
``kv_offload_backend``), plus kvbridge's own ``num_cpu_blocks``, ``store_decode_blocks``,
``block_size``, ``copy_strategy`` and ``load_mode``; the disk tier's keys are in
``kvbridge.offload.disk.config``.
An unknown key is an error that names it.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

from kvbridge.config import ConfigError, TransferConfig, check_extra_keys
from kvbridge.connector.types import KVCacheSpec
from kvbridge.copy.backend import parse_strategy
from kvbridge.offload.disk.config import (
    DISK_KEYS,
    DiskConfig,
    check_disk_extra,
    check_disk_spec,
    ignored_disk_keys,
)

logger = logging.getLogger(__name__)

_WHERE = "SimpleCPUOffloadConnector"
_KEYS: dict[str, type | tuple[type, ...]] = {
    "cpu_bytes_to_use": (int, float),
    "cpu_bytes_to_use_per_rank": (int, float),
    "num_cpu_blocks": int,
    "lazy_offload": bool,
    "lazy_offload_min_prefix_tokens": int,
    "kv_offload_backend": str,
    "store_decode_blocks": bool,
    "block_size": int,
    "copy_strategy": str,
    "load_mode": str,
    **DISK_KEYS,
}
# vLLM's default CPU capacity, server-wide (split by world size).
DEFAULT_CPU_BYTES = 8 << 30
ATTENTION_KINDS = ("full", "sliding_window")
# async: a hit loads between steps, the request computes in a later step (the step's other
# requests never wait for PCIe). layerwise: the hit loads inside the step that computes the
# request, layer by layer, and layer i computes while later layers still copy (lowest TTFT;
# the step's other requests wait for the copy).
LOAD_MODES = ("async", "layerwise")
_GIB = float(1 << 30)


@dataclass(frozen=True)
class CPUPoolSize:
    """How many CPU blocks one worker holds, and the most it could hold."""

    num_cpu_blocks: int
    capacity: int
    bytes_per_block: int
    clamped: bool = False  # the bytes held no block; one is used anyway (as vLLM does)

    @property
    def total_bytes(self) -> int:
        return self.num_cpu_blocks * self.bytes_per_block


@dataclass(frozen=True)
class OffloadConfig:
    """Validated settings of the CPU tier (identical in the scheduler and every worker).

    ``warnings`` are logged once, by the scheduler half, at start-up.
    """

    num_cpu_blocks: int
    block_size: int
    store_decode_blocks: bool = False
    lazy_offload: bool = False
    lazy_offload_min_prefix_tokens: int = 0
    copy_strategy: str | None = None  # None: the copy backend's default
    load_mode: str = "async"  # one of LOAD_MODES
    warnings: tuple[str, ...] = ()
    disk: DiskConfig | None = None  # the disk tier behind the CPU tier (kv_offload_backend)


def cpu_block_bytes(spec: KVCacheSpec) -> int:
    """Bytes of one CPU block id: one block of the layers of one group.

    A block id belongs to one group at a time (as the engine's GPU ids do), so on a hybrid
    cache the groups share the CPU memory of a block id, slot by slot; on a single-group cache
    this is ``spec.block_bytes``.
    """
    if spec.num_groups == 1:
        return spec.block_bytes
    return spec.block_bytes_per_layer * max(len(g.layer_names) for g in spec.groups)


def group_windows(spec: KVCacheSpec) -> tuple[int | None, ...]:
    """Each group's sliding window in tokens (None: full attention); other kinds are errors."""
    windows: list[int | None] = []
    for i, group in enumerate(spec.groups):
        if group.attention not in ATTENTION_KINDS:
            raise ConfigError(
                f"cache_spec.groups[{i}].attention: {group.attention!r} is not one of "
                f"{', '.join(ATTENTION_KINDS)}; {_WHERE} stores full and sliding-window KV only"
            )
        if group.attention == "full":
            windows.append(None)
            continue
        window = group.sliding_window
        if not isinstance(window, int) or window < 1:
            raise ConfigError(
                f"cache_spec.groups[{i}].sliding_window: a sliding-window group needs a "
                f"positive window in tokens, got {window!r}"
            )
        windows.append(window)
    return tuple(windows)


def derive_cpu_config(
    spec: KVCacheSpec,
    *,
    cpu_bytes_to_use: float | None = None,
    cpu_bytes_to_use_per_rank: float | None = None,
    num_cpu_blocks: int | None = None,
    host_bytes: int | None = None,
) -> CPUPoolSize:
    """Size one worker's CPU pool: cpu_blocks = bytes per rank / bytes of a CPU block.

    Bytes per rank: ``cpu_bytes_to_use_per_rank``, else ``cpu_bytes_to_use`` (server-wide)
    split by ``spec.world_size``, else, with an explicit ``num_cpu_blocks``, the host's
    physical memory per worker (``host_bytes`` overrides it in tests), else vLLM's default of
    8 GiB server-wide. An explicit ``num_cpu_blocks`` must lie in 1..capacity; bytes that hold
    no block give one block (vLLM's ``max(1, ...)``).
    """
    if cpu_bytes_to_use_per_rank is not None:
        per_worker = int(cpu_bytes_to_use_per_rank)
    elif cpu_bytes_to_use is not None:
        per_worker = int(cpu_bytes_to_use) // spec.world_size
    elif num_cpu_blocks is not None:
        host = _host_memory_bytes() if host_bytes is None else host_bytes
        per_worker = host // spec.world_size
    else:
        per_worker = DEFAULT_CPU_BYTES // spec.world_size
    block_bytes = cpu_block_bytes(spec)
    capacity = per_worker // block_bytes
    if num_cpu_blocks is None:
        return CPUPoolSize(max(1, capacity), max(1, capacity), block_bytes, clamped=capacity < 1)
    if not 1 <= num_cpu_blocks <= capacity:
        raise ConfigError(
            f"kv_connector_extra_config.num_cpu_blocks: {num_cpu_blocks} is outside 1..{capacity} "
            f"(the capacity at {block_bytes} bytes per block)"
        )
    return CPUPoolSize(num_cpu_blocks, capacity, block_bytes)


def check_offload_extra(config: TransferConfig) -> dict[str, Any]:
    """The checks of ``kv_connector_extra_config`` that need no cache spec; errors name the key."""
    extra = check_extra_keys(config, _KEYS, where=_WHERE)
    for key in ("cpu_bytes_to_use", "cpu_bytes_to_use_per_rank", "num_cpu_blocks"):
        value = extra.get(key)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(
                f"kv_connector_extra_config.{key}: must be a finite number > 0, got {value}"
            )
    check_disk_extra(extra)
    min_prefix = extra.get("lazy_offload_min_prefix_tokens")
    if min_prefix is not None and min_prefix < 0:
        raise ConfigError(
            f"kv_connector_extra_config.lazy_offload_min_prefix_tokens: must be >= 0, "
            f"got {min_prefix}"
        )
    strategy = extra.get("copy_strategy")
    if strategy is not None:
        try:
            parse_strategy(strategy)
        except ValueError as e:  # "copy_strategy: ... is not one of ..."
            raise ConfigError(f"kv_connector_extra_config.{e}") from e
    mode = extra.get("load_mode")
    if mode is not None and mode not in LOAD_MODES:
        raise ConfigError(
            f"kv_connector_extra_config.load_mode: {mode!r} is not one of "
            f"{', '.join(LOAD_MODES)} ('layerwise' for the lowest TTFT on a hit)"
        )
    return extra


def parse_offload_config(config: TransferConfig, spec: KVCacheSpec) -> OffloadConfig:
    """Validate ``config.kv_connector_extra_config`` against ``spec``; errors name the key."""
    extra = check_offload_extra(config)
    group_windows(spec)
    block_size = extra.get("block_size")
    if block_size is not None and block_size != spec.block_size:
        raise ConfigError(
            f"kv_connector_extra_config.block_size: {block_size} differs from the engine's "
            f"block size {spec.block_size}; the CPU tier stores whole engine blocks"
        )
    min_prefix = extra.get("lazy_offload_min_prefix_tokens")
    strategy = extra.get("copy_strategy")
    size = derive_cpu_config(
        spec,
        cpu_bytes_to_use=extra.get("cpu_bytes_to_use"),
        cpu_bytes_to_use_per_rank=extra.get("cpu_bytes_to_use_per_rank"),
        num_cpu_blocks=extra.get("num_cpu_blocks"),
    )
    lazy = bool(extra.get("lazy_offload", False))
    disk = check_disk_extra(extra)
    if disk is not None:
        check_disk_spec(disk, spec)
    return OffloadConfig(
        num_cpu_blocks=size.num_cpu_blocks,
        block_size=spec.block_size,
        store_decode_blocks=bool(extra.get("store_decode_blocks", False)),
        lazy_offload=lazy,
        lazy_offload_min_prefix_tokens=min_prefix or 0,
        copy_strategy=strategy,
        load_mode=extra.get("load_mode") or "async",
        warnings=_startup_warnings(extra, spec, size, lazy),
        disk=disk,
    )


def _startup_warnings(
    extra: dict[str, Any], spec: KVCacheSpec, size: CPUPoolSize, lazy: bool
) -> tuple[str, ...]:
    out: list[str] = []
    per_rank = extra.get("cpu_bytes_to_use_per_rank")
    if per_rank is not None:
        share = int(extra.get("cpu_bytes_to_use") or DEFAULT_CPU_BYTES) // spec.world_size
        if int(per_rank) != share:  # as vLLM: warn, then use the per-rank value
            out.append(
                f"{_WHERE}: cpu_bytes_to_use_per_rank ({int(per_rank) / _GIB:.2f} GiB) != "
                f"cpu_bytes_to_use/world_size ({share / _GIB:.2f} GiB); using the per-rank value"
            )
    if size.clamped:
        out.append(
            f"{_WHERE}: the CPU bytes per rank hold no block of {size.bytes_per_block} bytes; "
            "using 1 CPU block"
        )
    ignored = ignored_disk_keys(extra)
    if ignored:
        out.append(
            f"{_WHERE}: {', '.join(ignored)} ignored: kv_offload_backend is 'cpu' (set it to "
            "'disk' for the disk tier)"
        )
    if lazy:
        out.append(
            f"{_WHERE}: lazy_offload is accepted but kvbridge stores eagerly (its connector "
            "contract has no hook before the GPU pool evicts a block): the same blocks reach "
            "the CPU tier and the same prefixes hit, at the cost of more GPU->CPU copies; "
            "lazy_offload_min_prefix_tokens has no effect"
        )
    return tuple(out)


def log_startup_warnings(offload: OffloadConfig) -> None:
    """Log the config's warnings (once per engine: the scheduler half calls it)."""
    for message in offload.warnings:
        logger.warning("%s", message)


def warn_if_churning(offload: OffloadConfig, spec: KVCacheSpec) -> bool:
    """Warn when the CPU pool is smaller than the GPU cache; returns whether it warned."""
    if offload.num_cpu_blocks >= spec.num_blocks:
        return False
    logger.warning(
        "%s: CPU pool of %d blocks is smaller than the GPU cache (%d blocks); it mostly churns "
        "and rarely serves a hit; raise cpu_bytes_to_use",
        _WHERE,
        offload.num_cpu_blocks,
        spec.num_blocks,
    )
    return True


def _host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 1 << 40
