"""Chained block hashes: prefix semantics, incremental growth, and stability across processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvbridge.engine.request import Request
from kvbridge.engine.sampling import SamplingParams
from kvbridge.kit.hashing import BlockHasher

TOKENS = list(range(100, 137))  # 37 tokens: 9 full blocks of 4 and one partial


def test_only_full_blocks_are_hashed_and_each_depends_on_its_prefix() -> None:
    h = BlockHasher(4)
    hashes = h.hash_tokens(TOKENS)
    assert len(hashes) == 9 and len(set(hashes)) == 9
    changed = TOKENS.copy()
    changed[5] += 1  # inside block 1: blocks 1.. change, block 0 does not
    other = h.hash_tokens(changed)
    assert other[0] == hashes[0]
    assert all(a != b for a, b in zip(other[1:], hashes[1:]))
    # Same block contents after a different prefix -> different hash (chaining).
    assert h.hash_tokens(TOKENS[4:8])[0] != hashes[1]


def test_extra_key_and_algorithm_change_the_hash() -> None:
    h = BlockHasher(4)
    base = h.hash_tokens(TOKENS)[0]
    assert h.hash_tokens(TOKENS, extra_key=b"salt")[0] != base
    sha = BlockHasher(4, "sha256").hash_tokens(TOKENS)
    assert len(sha[0]) == 32 and len(base) == 16
    with pytest.raises(ValueError, match="hash_algo"):
        BlockHasher(4, "md5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected 4"):
        h.hash_block(None, [1, 2, 3])


def test_request_hashes_grow_with_generated_tokens() -> None:
    h = BlockHasher(4)
    request = Request("r", TOKENS[:7], SamplingParams(), hasher=h)
    assert request.block_hashes == h.hash_tokens(TOKENS[:7])  # one full block
    for tok in TOKENS[7:13]:
        request.append_output_token(tok)
    assert request.block_hashes == h.hash_tokens(TOKENS[:13])  # three full blocks
    assert Request("s", TOKENS, SamplingParams()).block_hashes == []  # no hasher: none


_CHILD = (
    "from kvbridge.kit.hashing import BlockHasher\n"
    "toks = list(range(100, 137))\n"
    "for algo in ('xxh3_128', 'sha256'):\n"
    "    print(algo, ','.join(x.hex() for x in BlockHasher(4, algo).hash_tokens(toks)))\n"
)


def test_hashes_are_identical_in_other_processes() -> None:
    ours = "".join(
        f"{algo} {','.join(x.hex() for x in BlockHasher(4, algo).hash_tokens(TOKENS))}\n"
        for algo in ("xxh3_128", "sha256")
    )
    for seed in ("0", "12345"):  # Python's hash() would differ with PYTHONHASHSEED
        env = {**os.environ, "PYTHONHASHSEED": seed}
        result = subprocess.run(
            [sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == ours


def test_hash_value_is_pinned() -> None:
    """Digest of a fixed input: stored hashes (CPU tier, remote engines) must stay valid."""
    first = BlockHasher(4).hash_block(None, [1, 2, 3, 4])
    second = BlockHasher(4).hash_block(first, [5, 6, 7, 8])
    assert first.hex() == "6ef0e63228cb3e7b3cdb9806e334b887"
    assert second.hex() == "0a8cf87a6c94b25195837ff169e24207"
