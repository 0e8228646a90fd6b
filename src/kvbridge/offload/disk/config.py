"""Disk tier settings: the disk keys of SimpleCPUOffloadConnector's extra config, parsed once.

Names and meanings follow vLLM where it has the feature: SimpleCPUOffloadConnector's disk
backend (``kv_offload_backend: "disk"``, ``disk_path``, ``disk_capacity_bytes``,
``disk_buffer_slots``, ``use_page_cache``, ``direct_io_alignment``) and the thread counts of
OffloadingConnector's ``fs`` tier (``n_read_threads``, ``n_write_threads``). One difference,
by design: vLLM's disk backend replaces the DRAM pool (DRAM only stages), kvbridge's sits
*behind* the CPU tier (as vLLM's ``TieringOffloadingSpec`` secondary tiers do): blocks stored
on the CPU tier are written to disk, and a lookup that misses the CPU tier reads the disk
back into CPU blocks. ``disk_namespace`` and ``disk_recompute_guard`` are kvbridge's own (see
``DiskConfig``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kvbridge.config import ConfigError
from kvbridge.connector.types import KVCacheSpec
from kvbridge.offload.disk.record import group_payload_bytes, record_size

DISK_KEYS: dict[str, type | tuple[type, ...]] = {
    "disk_path": str,
    "disk_capacity_bytes": (int, float),
    "disk_buffer_slots": int,
    "use_page_cache": bool,
    "direct_io_alignment": int,
    "n_read_threads": int,
    "n_write_threads": int,
    "disk_namespace": str,
    "disk_recompute_guard": bool,
}
BACKENDS = ("cpu", "disk")
DEFAULT_ALIGNMENT = 4096  # vLLM's default direct_io_alignment
DEFAULT_THREADS = 16  # vLLM's fs tier: 16 read + 16 write threads
_P = "kv_connector_extra_config"


@dataclass(frozen=True)
class DiskConfig:
    """Validated disk tier settings (the same in the scheduler and every worker).

    ``path``: a directory (vLLM's ``disk_path`` names one slot file; kvbridge keeps one file
    per block, under ``<path>/<model>_<digest>/``, so a path vLLM accepts works here as a
    directory). ``capacity_bytes``: bytes of records on disk per worker, LRU-evicted beyond.
    ``direct``: O_DIRECT (``use_page_cache`` false, vLLM's default) where the filesystem
    allows it. ``namespace``: extra identity of the weights mixed into the directory digest
    (the model name, dtype, layout and shapes always are): set it when two models share a name,
    e.g. random weights from different seeds.
    """

    path: str
    capacity_bytes: int
    direct: bool = True
    alignment: int = DEFAULT_ALIGNMENT
    n_read_threads: int = DEFAULT_THREADS
    n_write_threads: int = DEFAULT_THREADS
    namespace: str = ""
    recompute_guard: bool = True


def check_disk_extra(extra: dict[str, Any]) -> DiskConfig | None:
    """The disk tier's settings from checked extra config; None when the tier is off.

    Raises ``ConfigError`` naming the key and the fix; needs no cache spec.
    """
    backend = extra.get("kv_offload_backend") or "cpu"
    if backend not in BACKENDS:
        raise ConfigError(
            f"{_P}.kv_offload_backend: {backend!r} is not one of {', '.join(BACKENDS)} "
            "('disk' adds a disk tier behind the CPU tier)"
        )
    if backend == "cpu":
        return None  # disk keys are ignored, as vLLM does (``ignored_disk_keys`` warns)
    path = extra.get("disk_path")
    if not path:
        raise ConfigError(
            f"{_P}.disk_path: kv_offload_backend 'disk' needs a directory for the disk tier, "
            'e.g. "disk_path": "/mnt/nvme/kvbridge"'
        )
    capacity = extra.get("disk_capacity_bytes")
    if capacity is None or not math.isfinite(capacity) or capacity <= 0:
        raise ConfigError(
            f"{_P}.disk_capacity_bytes: kv_offload_backend 'disk' needs a positive byte "
            f"budget per worker, a finite number such as 100e9, got {capacity!r}"
        )
    alignment = extra.get("direct_io_alignment", DEFAULT_ALIGNMENT)
    if alignment < 512 or alignment & (alignment - 1):
        raise ConfigError(
            f"{_P}.direct_io_alignment: {alignment} is not a power of two >= 512 "
            "(the filesystem's logical block size, usually 512 or 4096)"
        )
    for key in ("n_read_threads", "n_write_threads", "disk_buffer_slots"):
        value = extra.get(key)
        if value is not None and value < 1:
            raise ConfigError(f"{_P}.{key}: must be >= 1, got {value}")
    guard = extra.get("disk_recompute_guard")
    if guard is not None and not isinstance(guard, bool):
        raise ConfigError(
            f"{_P}.disk_recompute_guard: expected true or false, got {guard!r}; false reads "
            "every disk hit back even when recomputing it would be faster"
        )
    return DiskConfig(
        path=str(path),
        capacity_bytes=int(capacity),
        direct=not extra.get("use_page_cache", False),
        alignment=alignment,
        n_read_threads=extra.get("n_read_threads") or DEFAULT_THREADS,
        n_write_threads=extra.get("n_write_threads") or DEFAULT_THREADS,
        namespace=extra.get("disk_namespace") or "",
        recompute_guard=guard is not False,
    )


def ignored_disk_keys(extra: dict[str, Any]) -> list[str]:
    """Disk keys set while the backend is 'cpu' (vLLM accepts and ignores them too)."""
    if (extra.get("kv_offload_backend") or "cpu") != "cpu":
        return []
    return [k for k in DISK_KEYS if extra.get(k) is not None]


def check_disk_spec(disk: DiskConfig, spec: KVCacheSpec) -> None:
    """The checks that need the cache spec; ``ConfigError`` naming the key and the fix."""
    if spec.world_size > 1:
        raise ConfigError(
            f"{_P}.kv_offload_backend: the disk tier runs with one worker (world_size "
            f"{spec.world_size}); use 'cpu' with tensor parallelism"
        )
    largest = max(record_size(n, disk.alignment) for n in group_payload_bytes(spec))
    if disk.capacity_bytes < largest:
        raise ConfigError(
            f"{_P}.disk_capacity_bytes: {disk.capacity_bytes} bytes hold no block record of "
            f"{largest} bytes; raise it"
        )
