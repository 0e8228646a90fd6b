"""Chained block hashes over full blocks of token ids, stable across processes and machines.

A block's hash covers its parent's hash, its token ids and an optional extra key (e.g. a cache
salt), so equal hashes mean equal prefixes. Token ids are encoded as little-endian int64 and
the digest is xxh3_128 (default) or sha256; Python's ``hash()`` is never used (it is salted
per process). Torch-free.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence
from typing import Literal

import xxhash

HashAlgo = Literal["xxh3_128", "sha256"]
HASH_ALGOS: tuple[str, ...] = ("xxh3_128", "sha256")

# Parent of a request's first block: a fixed, non-empty value so that an empty parent and a
# missing parent cannot collide with any real digest length.
ROOT_HASH = b"kvbridge/root/v1"


def _digest(algo: HashAlgo) -> Callable[[bytes], bytes]:
    if algo == "xxh3_128":
        return lambda data: xxhash.xxh3_128_digest(data)
    if algo == "sha256":
        return lambda data: hashlib.sha256(data).digest()
    raise ValueError(f"hash_algo: {algo!r} is not one of {', '.join(HASH_ALGOS)}")


def encode_tokens(token_ids: Sequence[int]) -> bytes:
    """Little-endian int64 encoding of ``token_ids`` (the same bytes on every platform)."""
    return struct.pack(f"<{len(token_ids)}q", *token_ids)


class BlockHasher:
    """Computes chained hashes of full ``block_size``-token blocks."""

    def __init__(self, block_size: int, algo: HashAlgo = "xxh3_128") -> None:
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size: must be a positive int, got {block_size!r}")
        self.block_size = block_size
        self.algo = algo
        self._digest = _digest(algo)

    def hash_block(
        self, parent: bytes | None, token_ids: Sequence[int], extra_key: bytes | None = None
    ) -> bytes:
        """Hash of one full block given its parent's hash (``None`` for the first block)."""
        if len(token_ids) != self.block_size:
            raise ValueError(
                f"hash_block: expected {self.block_size} token ids, got {len(token_ids)}"
            )
        parent = ROOT_HASH if parent is None else parent
        extra = b"" if extra_key is None else extra_key
        # parent length | parent | extra length | extra | tokens: unambiguous concatenation.
        header = struct.pack("<I", len(parent)) + parent + struct.pack("<I", len(extra)) + extra
        return self._digest(header + encode_tokens(token_ids))

    def extend(
        self,
        hashes: list[bytes],
        token_ids: Sequence[int],
        extra_key: bytes | None = None,
    ) -> list[bytes]:
        """Append to ``hashes`` the hashes of the full blocks of ``token_ids`` not yet hashed."""
        bs = self.block_size
        for i in range(len(hashes), len(token_ids) // bs):
            parent = hashes[i - 1] if i else None
            hashes.append(self.hash_block(parent, token_ids[i * bs : (i + 1) * bs], extra_key))
        return hashes

    def hash_tokens(self, token_ids: Sequence[int], extra_key: bytes | None = None) -> list[bytes]:
        """Hashes of every full block of ``token_ids``."""
        return self.extend([], token_ids, extra_key)
