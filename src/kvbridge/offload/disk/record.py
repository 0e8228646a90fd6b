"""The disk tier's on-disk format: one file per (group, block hash), a checksummed record.

::

    <disk_path>/<model>_<digest>/            digest: sha256 of model name, dtype, layout, shapes,
                                              alignment
        namespace.json                        what the digest covers (written once, atomically)
        <hh>/<block hash hex>.g<group>.kvb    hh: the hash's first byte, to bound directory size

A record is a header of ``alignment`` bytes, then the block's payload (each layer's block
bytes in the group's layer order) zero-padded to a multiple of ``alignment``, so that O_DIRECT
can read and write it whole::

    [magic 8 | version 4 | header_len 4 | payload_len 8 | group 4 | hash_len 4 | namespace 16 |
     payload xxh3_64 8 | block hash (hash_len) | header xxh3_64 8 | zeros ...] [payload | pad]

Every field is checked on read (``parse_header``): a record from another namespace, group or
block, a torn header or a payload whose checksum differs is never loaded. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path
from typing import NamedTuple

import xxhash

from kvbridge.connector.types import KVCacheSpec

MAGIC = b"KVBDISK1"
VERSION = 1
SUFFIX = ".kvb"
_FIXED = struct.Struct("<8sIIQII16sQ")
_CHECK = struct.Struct("<Q")
MAX_HASH_BYTES = 64
_NAME = re.compile(r"^([0-9a-f]{2,128})\.g(\d+)\.kvb$")


class CorruptRecord(ValueError):
    """A record that must not be loaded (torn, truncated, flipped or another block's)."""


class Header(NamedTuple):
    """A record's header fields."""

    payload_len: int
    group: int
    block_hash: bytes
    payload_checksum: int


def align_up(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def group_payload_bytes(spec: KVCacheSpec) -> list[int]:
    """group -> payload bytes of one block (its layers' block bytes)."""
    if spec.num_groups == 1:
        return [spec.block_bytes]
    return [spec.block_bytes_per_layer * len(g.layer_names) for g in spec.groups]


def namespace_fields(spec: KVCacheSpec, extra: str, alignment: int) -> dict[str, object]:
    """Everything that must match for a record's bytes to be valid KV for this engine (the
    alignment sets the header and record sizes: servers with different ones get different
    directories instead of deleting each other's records as torn)."""
    return {
        "format": VERSION,
        "alignment": alignment,
        "model_name": spec.model_name,
        "namespace": extra,
        "dtype": spec.dtype,
        "layout": spec.layout.value,
        "block_size": spec.block_size,
        "num_layers": spec.num_layers,
        "num_kv_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "world_size": spec.world_size,
        "groups": [[g.attention, g.sliding_window, len(g.layer_names)] for g in spec.groups],
    }


def namespace_digest(fields: dict[str, object]) -> bytes:
    """16 bytes naming the namespace (in every record header and in the directory name)."""
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).digest()[:16]


def namespace_dir(root: str | Path, fields: dict[str, object]) -> Path:
    model = re.sub(r"[^A-Za-z0-9._-]", "_", str(fields["model_name"]) or "model")
    return Path(root) / f"{model}_{namespace_digest(fields).hex()}"


def record_path(ns_dir: Path, group: int, block_hash: bytes) -> Path:
    hexed = block_hash.hex()
    return ns_dir / hexed[:2] / f"{hexed}.g{group}{SUFFIX}"


def parse_record_name(name: str) -> tuple[int, bytes] | None:
    """(group, block hash) of a record file name; None for any other file."""
    m = _NAME.match(name)
    if m is None or len(m.group(1)) % 2:
        return None
    return int(m.group(2)), bytes.fromhex(m.group(1))


def record_size(payload_len: int, alignment: int) -> int:
    """Bytes of a record file: the header block and the padded payload."""
    return alignment + align_up(payload_len, alignment)


def pack_header(
    out: memoryview, namespace: bytes, group: int, block_hash: bytes, payload_len: int,
    payload_checksum: int,
) -> None:  # fmt: skip
    """Write a header into ``out`` (``alignment`` bytes, zeroed beyond the header)."""
    if len(block_hash) > MAX_HASH_BYTES:
        raise ValueError(f"block hash of {len(block_hash)} bytes; at most {MAX_HASH_BYTES}")
    head = _FIXED.pack(
        MAGIC, VERSION, len(out), payload_len, group, len(block_hash), namespace,
        payload_checksum,
    ) + block_hash  # fmt: skip
    out[:] = bytes(len(out))
    out[: len(head)] = head
    out[len(head) : len(head) + _CHECK.size] = _CHECK.pack(xxhash.xxh3_64_intdigest(head))


def parse_header(buf: memoryview, namespace: bytes) -> Header:
    """The header in ``buf``; ``CorruptRecord`` if torn, flipped or of another namespace."""
    if len(buf) < _FIXED.size:
        raise CorruptRecord("short header")
    magic, version, header_len, payload_len, group, hash_len, ns, checksum = _FIXED.unpack_from(buf)
    if magic != MAGIC or version != VERSION:
        raise CorruptRecord(f"bad magic or version ({magic!r}, {version})")
    end = _FIXED.size + hash_len
    if hash_len > MAX_HASH_BYTES or header_len != len(buf) or end + _CHECK.size > len(buf):
        raise CorruptRecord(f"bad header lengths ({header_len}, {hash_len})")
    (want,) = _CHECK.unpack_from(buf, end)
    if xxhash.xxh3_64_intdigest(buf[:end]) != want:
        raise CorruptRecord("header checksum mismatch")
    if ns != namespace:
        raise CorruptRecord("record of another namespace")
    return Header(payload_len, group, bytes(buf[_FIXED.size : end]), checksum)
