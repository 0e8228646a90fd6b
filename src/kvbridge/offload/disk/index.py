"""DiskIndex: which (group, block hash) records are on disk, their bytes, LRU order and pins.

Rebuilt at start by scanning the namespace directory (names and sizes only, oldest
modification first), so lookups are dictionary reads and never touch the disk. Torch-free.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from kvbridge.connector.types import IntegrityError
from kvbridge.offload.disk.io import TMP_SUFFIX
from kvbridge.offload.disk.record import SUFFIX, parse_record_name, record_path
from kvbridge.offload.pool import BlockKey

logger = logging.getLogger(__name__)

# A temporary file older than this belongs to a writer that died (or a very slow disk).
STALE_TMP_S = 3600.0


@dataclass
class _Entry:
    size: int
    ready: bool  # False: a write is in flight (not a hit yet)
    pins: int = 0  # reads in flight


class ScanResult(NamedTuple):
    """What a start-up scan found."""

    entries: list[tuple[BlockKey, int, float]]  # key, bytes, mtime
    wrong_size: list[BlockKey]  # records whose size no block of this spec has (torn)
    stale_tmp: list[Path]


def scan(ns_dir: Path, sizes: list[int]) -> ScanResult:
    """The records under ``ns_dir`` whose group exists and whose size is ``sizes[group]``.

    A record file counts only at the path ``record_path`` gives its key (its shard, a
    canonical name), so each key is found once; a stray copy elsewhere is skipped (logged).
    """
    entries: list[tuple[BlockKey, int, float]] = []
    wrong: list[BlockKey] = []
    stale: list[Path] = []
    strays: list[str] = []
    if not ns_dir.is_dir():
        return ScanResult(entries, wrong, stale)
    now = time.time()
    with os.scandir(ns_dir) as shards:
        for shard in shards:
            if not shard.is_dir(follow_symlinks=False):
                continue
            with os.scandir(shard.path) as files:
                for f in files:
                    try:
                        st = f.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if f.name.endswith(TMP_SUFFIX):
                        if now - st.st_mtime > STALE_TMP_S:
                            stale.append(Path(f.path))
                        continue
                    key = parse_record_name(f.name) if f.name.endswith(SUFFIX) else None
                    if key is None or not 0 <= key[0] < len(sizes):
                        continue
                    if (shard.name, f.name) != _place(key):
                        strays.append(f.path)
                        continue
                    if st.st_size != sizes[key[0]]:
                        wrong.append(key)
                        continue
                    entries.append((key, st.st_size, st.st_mtime))
    if strays:
        logger.warning(
            "disk tier: %d record file(s) not where their name puts them (e.g. %s), "
            "left alone and not indexed",
            len(strays),
            strays[0],
        )
    entries.sort(key=lambda e: e[2])
    return ScanResult(entries, wrong, stale)


def _place(key: BlockKey) -> tuple[str, str]:
    """(shard directory, file name) of ``key``'s record, as ``record_path`` makes them."""
    path = record_path(Path(), *key)
    return path.parent.name, path.name


class DiskIndex:
    """Runs in the scheduler; owns the disk tier's records, their LRU order and capacity.

    A record is *writing* (reserved by ``reserve`` until ``commit`` or ``remove``) or *ready*
    (a hit). Ready records with no pin may be evicted, oldest use first, to make room.
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._entries: OrderedDict[BlockKey, _Entry] = OrderedDict()  # oldest use first

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: BlockKey) -> bool:
        return key in self._entries

    def has(self, key: BlockKey) -> bool:
        """Whether a whole record of ``key`` is on disk (a write in flight is not)."""
        entry = self._entries.get(key)
        return entry is not None and entry.ready

    @property
    def num_pins(self) -> int:
        return sum(e.pins for e in self._entries.values())

    def add_ready(self, key: BlockKey, size: int) -> list[BlockKey]:
        """Index a record found on disk; returns records evicted to fit it (if any)."""
        evicted = self.reserve(key, size)
        if evicted is None:
            return [key]
        self.commit(key)
        return evicted

    def reserve(self, key: BlockKey, size: int) -> list[BlockKey] | None:
        """Reserve ``size`` bytes for a write of ``key``, evicting LRU ready records; the
        evicted keys, or None (nothing changed) if pins and writes leave no room."""
        if key in self._entries:
            raise KeyError(f"DiskIndex.reserve: {key!r} is already indexed")
        need = self.used_bytes + size - self.capacity_bytes
        victims: list[BlockKey] = []
        if need > 0:
            for k, e in self._entries.items():
                if e.ready and not e.pins:
                    victims.append(k)
                    need -= e.size
                    if need <= 0:
                        break
            if need > 0:
                return None
        for k in victims:
            self.remove(k)
        self._entries[key] = _Entry(size, ready=False)
        self.used_bytes += size
        return victims

    def commit(self, key: BlockKey) -> None:
        self._entries[key].ready = True

    def remove(self, key: BlockKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.used_bytes -= entry.size

    def touch(self, key: BlockKey) -> None:
        if key in self._entries:
            self._entries.move_to_end(key)

    def pin(self, key: BlockKey) -> None:
        entry = self._entries[key]
        if not entry.ready:
            raise KeyError(f"DiskIndex.pin: {key!r} is not ready")
        entry.pins += 1

    def unpin(self, key: BlockKey) -> None:
        entry = self._entries.get(key)
        if entry is None or entry.pins <= 0:
            raise RuntimeError(f"DiskIndex.unpin: {key!r} is not pinned")
        entry.pins -= 1

    def check_integrity(self) -> None:
        """Raise ``IntegrityError`` if the byte count or pins are inconsistent."""
        total = sum(e.size for e in self._entries.values())
        if total != self.used_bytes:
            raise IntegrityError(
                f"DiskIndex integrity: {total} bytes indexed, {self.used_bytes} counted"
            )
        if self.used_bytes > self.capacity_bytes:
            raise IntegrityError(
                f"DiskIndex integrity: {self.used_bytes} bytes over the capacity "
                f"{self.capacity_bytes}"
            )
        if any(e.pins < 0 or (e.pins and not e.ready) for e in self._entries.values()):
            raise IntegrityError("DiskIndex integrity: a pin on a record that is not ready")
