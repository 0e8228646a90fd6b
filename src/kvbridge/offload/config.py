"""Offload settings: ``kv_connector_extra_config`` of SimpleCPUOffloadConnector, parsed once."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from kvbridge.config import ConfigError, TransferConfig, check_extra_keys
from kvbridge.connector.types import KVCacheSpec

logger = logging.getLogger(__name__)

_WHERE = "SimpleCPUOffloadConnector"
_KEYS: dict[str, type | tuple[type, ...]] = {
    "cpu_bytes_to_use": (int, float),
    "num_cpu_blocks": int,
    "lazy_offload": bool,
    "store_decode_blocks": bool,
    "block_size": int,
    "copy_strategy": str,
}
# CUDA copy strategies (offload/cuda_copy.py); "STORE/LOAD" picks one per direction.
COPY_STRATEGIES = ("serial", "pipelined", "direct")


@dataclass(frozen=True)
class CPUPoolSize:
    """How many CPU blocks one worker holds, and the most it could hold."""

    num_cpu_blocks: int
    capacity: int
    bytes_per_block: int

    @property
    def total_bytes(self) -> int:
        return self.num_cpu_blocks * self.bytes_per_block


@dataclass(frozen=True)
class OffloadConfig:
    """Validated settings of the CPU tier (identical in the scheduler and every worker)."""

    num_cpu_blocks: int
    block_size: int
    store_decode_blocks: bool = False
    lazy_offload: bool = False
    copy_strategy: str | None = None  # None: the copy backend's default


def derive_cpu_config(
    spec: KVCacheSpec,
    *,
    cpu_bytes_to_use: float | None = None,
    num_cpu_blocks: int | None = None,
    host_bytes: int | None = None,
) -> CPUPoolSize:
    """Size one worker's CPU pool: cpu_blocks = gpu_blocks * cpu_bytes / gpu_bytes.

    ``cpu_bytes_to_use`` is server-wide and split by ``spec.world_size``; without it the
    capacity is the host's physical memory per worker (``host_bytes`` overrides it in tests).
    An explicit ``num_cpu_blocks`` must lie in 1..capacity.
    """
    gpu_bytes = spec.num_blocks * spec.block_bytes
    if cpu_bytes_to_use is not None:
        if cpu_bytes_to_use <= 0:
            raise ConfigError(
                f"kv_connector_extra_config.cpu_bytes_to_use: must be > 0, got {cpu_bytes_to_use}"
            )
        per_worker = int(cpu_bytes_to_use) // spec.world_size
        capacity = spec.num_blocks * per_worker // gpu_bytes
        if capacity < 1:
            raise ConfigError(
                f"kv_connector_extra_config.cpu_bytes_to_use: {int(cpu_bytes_to_use)} bytes over "
                f"{spec.world_size} worker(s) holds no block of {spec.block_bytes} bytes; "
                f"give at least {spec.block_bytes * spec.world_size}"
            )
    elif num_cpu_blocks is not None:
        host = _host_memory_bytes() if host_bytes is None else host_bytes
        capacity = spec.num_blocks * (host // spec.world_size) // gpu_bytes
    else:
        raise ConfigError(
            "kv_connector_extra_config.cpu_bytes_to_use: required (or num_cpu_blocks) to size "
            "the CPU pool of SimpleCPUOffloadConnector"
        )
    if num_cpu_blocks is None:
        return CPUPoolSize(capacity, capacity, spec.block_bytes)
    if not 1 <= num_cpu_blocks <= capacity:
        raise ConfigError(
            f"kv_connector_extra_config.num_cpu_blocks: {num_cpu_blocks} is outside 1..{capacity} "
            f"(the capacity at {spec.block_bytes} bytes per block)"
        )
    return CPUPoolSize(num_cpu_blocks, capacity, spec.block_bytes)


def parse_offload_config(config: TransferConfig, spec: KVCacheSpec) -> OffloadConfig:
    """Validate ``config.kv_connector_extra_config`` against ``spec``; errors name the key."""
    extra = check_extra_keys(config, _KEYS, where=_WHERE)
    if extra.get("lazy_offload"):
        raise ConfigError(
            "kv_connector_extra_config.lazy_offload: not supported yet (the engine contract has "
            "no hook before GPU eviction); leave it false to store eagerly"
        )
    block_size = extra.get("block_size")
    if block_size is not None and block_size != spec.block_size:
        raise ConfigError(
            f"kv_connector_extra_config.block_size: {block_size} differs from the engine's "
            f"block size {spec.block_size}; the CPU tier stores whole engine blocks"
        )
    strategy = extra.get("copy_strategy")
    if strategy is not None and (
        len(strategy.split("/")) > 2 or any(n not in COPY_STRATEGIES for n in strategy.split("/"))
    ):
        raise ConfigError(
            f"kv_connector_extra_config.copy_strategy: {strategy!r} is not one of "
            f"{', '.join(COPY_STRATEGIES)} (or STORE/LOAD, e.g. 'direct/pipelined')"
        )
    size = derive_cpu_config(
        spec,
        cpu_bytes_to_use=extra.get("cpu_bytes_to_use"),
        num_cpu_blocks=extra.get("num_cpu_blocks"),
    )
    return OffloadConfig(
        num_cpu_blocks=size.num_cpu_blocks,
        block_size=spec.block_size,
        store_decode_blocks=bool(extra.get("store_decode_blocks", False)),
        lazy_offload=False,
        copy_strategy=strategy,
    )


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
