"""Record file I/O: aligned buffers, the O_DIRECT probe, atomic writes and checked reads.

A write goes to a temporary file in the record's directory and is renamed over the final
name once complete, so a reader (this server or another sharing the directory) sees either
no record or a whole one, and a writer killed mid-write leaves only a temporary file. A read
checks the file size, the header and the payload checksum before the caller may use the
bytes. Buffers are ``memoryview``s; torch-free.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import secrets
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xxhash

from kvbridge.offload.disk.record import (
    CorruptRecord,
    align_up,
    pack_header,
    parse_header,
    record_size,
)

logger = logging.getLogger(__name__)

O_DIRECT = getattr(os, "O_DIRECT", 0)
TMP_SUFFIX = ".tmp"
RECORD_MODE = 0o600


class AlignedBuffer:
    """``size`` bytes of anonymous memory starting at a multiple of ``alignment``."""

    def __init__(self, size: int, alignment: int) -> None:
        self._map = mmap.mmap(-1, size + alignment)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        offset = -base % alignment
        self.view = memoryview(self._map)[offset : offset + size]


class Scratch:
    """One I/O thread's aligned buffers: a header block and a staging payload."""

    def __init__(self, max_payload: int, alignment: int) -> None:
        self.header = AlignedBuffer(alignment, alignment).view
        self.payload = AlignedBuffer(align_up(max_payload, alignment), alignment).view
        self.pad = AlignedBuffer(alignment, alignment).view  # a read's padding lands here


def is_aligned(buf: memoryview, alignment: int) -> bool:
    """Whether O_DIRECT may read or write ``buf`` in place (address and length aligned)."""
    if len(buf) % alignment:
        return False
    address = np.frombuffer(buf, dtype=np.uint8).ctypes.data
    return address % alignment == 0


def filesystem_type(path: str | Path) -> str:
    """The filesystem type of ``path`` from /proc/mounts (``"unknown"`` if not found)."""
    target = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = parts[1]
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, kind = mount, parts[2]
    except OSError:
        pass
    return kind


def unique_tag() -> str:
    """A temporary file's tag: pid and thread, and random bits, since servers in other
    containers sharing the directory may run with the same pid and thread id."""
    return f"{os.getpid()}.{threading.get_ident()}.{secrets.token_hex(6)}"


def probe_direct(directory: Path, alignment: int) -> str | None:
    """None if O_DIRECT reads and writes work in ``directory``, else why not."""
    if not O_DIRECT:
        return "O_DIRECT is not available on this platform"
    probe = directory / f".direct-probe.{unique_tag()}"
    buf = AlignedBuffer(alignment, alignment).view
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | O_DIRECT, 0o644)
        try:
            if os.pwrite(fd, buf, 0) != alignment or os.preadv(fd, [buf], 0) != alignment:
                return "short O_DIRECT transfer"
        finally:
            os.close(fd)
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    finally:
        probe.unlink(missing_ok=True)
    return None


def payload_checksum(parts: Sequence[memoryview]) -> int:
    h = xxhash.xxh3_64()
    for part in parts:
        h.update(part)
    return h.intdigest()


def _stage(parts: Sequence[memoryview], out: memoryview) -> None:
    dst = np.frombuffer(out, dtype=np.uint8)
    offset = 0
    for part in parts:
        n = len(part)
        np.copyto(dst[offset : offset + n], np.frombuffer(part, dtype=np.uint8))
        offset += n
    dst[offset:] = 0


class RecordIO:
    """Reads and writes records of one namespace; thread-safe (a ``Scratch`` per thread)."""

    def __init__(self, namespace: bytes, alignment: int, direct: bool, max_payload: int) -> None:
        self.namespace = namespace
        self.alignment = alignment
        self.direct = direct
        self._max_payload = max_payload
        self._local = threading.local()
        self._dirs: set[Path] = set()
        self._zeros = memoryview(bytes(alignment))

    def _scratch(self) -> Scratch:
        scratch: Scratch | None = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = Scratch(self._max_payload, self.alignment)
        return scratch

    def _flags(self) -> int:
        return O_DIRECT if self.direct else 0

    def _iov(
        self, parts: Sequence[memoryview], n: int, tail: memoryview
    ) -> list[memoryview] | None:
        """header, payload in place and padding; None when O_DIRECT needs the payload staged."""
        pad = align_up(n, self.alignment) - n
        if self.direct and (pad or not all(is_aligned(p, self.alignment) for p in parts)):
            return None
        return [self._scratch().header, *parts, *([tail[:pad]] if pad else [])]

    def write(self, path: Path, group: int, block_hash: bytes, parts: Sequence[memoryview]) -> int:
        """Write a record of ``parts`` (the payload, in order) atomically; its bytes on disk."""
        scratch = self._scratch()
        n = sum(len(p) for p in parts)
        size = record_size(n, self.alignment)
        pack_header(scratch.header, self.namespace, group, block_hash, n, payload_checksum(parts))
        iov = self._iov(parts, n, self._zeros)
        if iov is None:  # stage the payload whole, padded to the alignment
            _stage(parts, scratch.payload[: size - self.alignment])
            iov = [scratch.header, scratch.payload[: size - self.alignment]]
        parent = path.parent
        if parent not in self._dirs:
            parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(parent)
        tmp = parent / f".{path.name}.{unique_tag()}{TMP_SUFFIX}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | self._flags()
        try:  # owner-only: KV blocks encode the prompts (servers of one user share them)
            fd = os.open(tmp, flags, RECORD_MODE)
        except FileNotFoundError:  # the directory was removed under us: make it again
            parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, flags, RECORD_MODE)
        try:
            written = os.pwritev(fd, iov, 0)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        if written != size:
            tmp.unlink(missing_ok=True)
            raise OSError(f"short write of {path.name}: {written} of {size} bytes")
        os.replace(tmp, path)
        return size

    def read(self, path: Path, group: int, block_hash: bytes, parts: Sequence[memoryview]) -> int:
        """Fill ``parts`` from the record at ``path``; its bytes on disk.

        ``FileNotFoundError``: no record. ``CorruptRecord``: torn, truncated, flipped or not
        this block's; ``parts`` may then hold garbage and must not be used.
        """
        scratch = self._scratch()
        n = sum(len(p) for p in parts)
        size = record_size(n, self.alignment)
        fd = os.open(path, os.O_RDONLY | self._flags())
        try:
            actual = os.fstat(fd).st_size
            if actual != size:
                raise CorruptRecord(f"{path.name}: {actual} bytes, a record has {size}")
            iov = self._iov(parts, n, scratch.pad)
            staged = iov is None
            if iov is None:
                iov = [scratch.header, scratch.payload[: size - self.alignment]]
            got = os.preadv(fd, iov, 0)
        finally:
            os.close(fd)
        if got != size:
            raise CorruptRecord(f"{path.name}: read {got} of {size} bytes")
        header = parse_header(scratch.header, self.namespace)
        if (header.group, header.block_hash, header.payload_len) != (group, block_hash, n):
            raise CorruptRecord(f"{path.name}: the header names another block")
        body = [scratch.payload[:n]] if staged else list(parts)
        if payload_checksum(body) != header.payload_checksum:
            raise CorruptRecord(f"{path.name}: payload checksum mismatch")
        if staged:
            src = np.frombuffer(scratch.payload, dtype=np.uint8)
            offset = 0
            for part in parts:
                k = len(part)
                np.copyto(np.frombuffer(part, dtype=np.uint8), src[offset : offset + k])
                offset += k
        return size
