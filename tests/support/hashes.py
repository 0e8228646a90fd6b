"""Chained block hashes for requests built by hand (no engine)."""

from __future__ import annotations

import hashlib


def block_hashes(tokens: list[int], block_size: int) -> list[bytes]:
    """Chained hash of every full block (what an engine with prefix caching provides)."""
    out: list[bytes] = []
    prev = b""
    for i in range(len(tokens) // block_size):
        chunk = tokens[i * block_size : (i + 1) * block_size]
        prev = hashlib.sha256(prev + repr(chunk).encode()).digest()
        out.append(prev)
    return out
