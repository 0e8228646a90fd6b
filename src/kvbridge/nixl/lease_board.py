"""LeaseBoard: a producer's live leases as 64-bit words in NIXL-registered memory.

A consumer whose READ of a producer's blocks is DONE must know that the producer still held
them when the READ ended (a lapsed lease frees them for reuse). The lease question answers
that through the producer's side-channel thread, a round trip that outlasts a small READ; the
board answers it with one more one-sided READ, no producer code involved::

    producer   lease starts: board[slot] = word        lease ends: board[slot] = 0, and only
                                                       then the blocks go back to the engine
    consumer   data READ ... DONE -> board READ of the word's bucket (64 bytes)
               -> its word there: the lease was live after the READ ended -> land
               -> anything else (0, other words, ERR, no board): wait for the answer

``word = lease_word(salt, instance, request id, prompt hash, blocks digest)``: 64 bits of
blake2b over the lease's identity, 0 never used. The salt is random per board, the instance
is the producer worker's agent name, the prompt hash the consumer's own prompt's and the
digest names every block the producer holds for the request (``metadata.blocks_digest``): a
word written for another prompt, other blocks, a reused request id or an earlier producer
instance differs, and a match by chance is a 2**-64 event.

Slots: ``num_slots`` words in buckets of ``BOARD_WAYS`` (one aligned 64-byte READ); a word
lives in bucket ``word % num_buckets`` (both sides compute it: nothing travels per lease but
what the params already carry), in the bucket's first free slot. A lease whose bucket is full
gets no slot; its consumer falls back to the answer. The board's address and salt travel in
the handshake (``LeaseBoardInfo``, optional: a peer without it just asks).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from typing import Literal

import msgspec
import numpy as np
import numpy.typing as npt

from kvbridge.connector.types import IntegrityError
from kvbridge.nixl.metadata import blocks_digest
from kvbridge.nixl.transport import NixlTransport, RegDescs, XferItem

BOARD_WAYS = 8  # words per bucket: one 64-byte READ, one cache line
BUCKET_BYTES = 8 * BOARD_WAYS
DEFAULT_BOARD_SLOTS = 4096  # 32 KiB per producer worker
MAX_BOARD_SLOTS = 1 << 20  # a consumer prepares one descriptor per bucket: keep it bounded
MAX_SALT_CHARS = 64
BoardVerdict = Literal["mine", "zero", "other", "failed"]


class LeaseBoardInfo(msgspec.Struct, frozen=True, kw_only=True):
    """Handshake: where a producer worker's lease board lives (registered DRAM) and its salt."""

    addr: int
    num_slots: int
    salt: str
    ways: int = BOARD_WAYS
    device_id: int = 0

    def problem(self) -> str | None:
        """Why a consumer cannot read this board (None: it can)."""
        if self.ways != BOARD_WAYS:
            return f"{self.ways} words per bucket, this consumer reads {BOARD_WAYS}"
        if board_size_error(self.num_slots) is not None or self.num_slots == 0:
            return f"{self.num_slots} slots"
        if self.addr <= 0 or self.addr % 8:
            return f"address {self.addr:#x} is not an aligned host address"
        if not 0 < len(self.salt) <= MAX_SALT_CHARS:
            return f"a salt of {len(self.salt)} characters"
        return None

    def items(self) -> list[XferItem]:
        """One transfer descriptor per bucket, in bucket order."""
        return [
            (self.addr + b * BUCKET_BYTES, BUCKET_BYTES, self.device_id)
            for b in range(self.num_slots // BOARD_WAYS)
        ]


def board_size_error(num_slots: int) -> str | None:
    """What is wrong with a board of ``num_slots`` (0: no board), or None."""
    if num_slots == 0:
        return None
    if not BOARD_WAYS <= num_slots <= MAX_BOARD_SLOTS or num_slots % BOARD_WAYS:
        return (
            f"must be 0 (no board) or a multiple of {BOARD_WAYS} in {BOARD_WAYS}.."
            f"{MAX_BOARD_SLOTS}, got {num_slots}"
        )
    return None


def lease_word(salt: str, instance_id: str, request_id: str, prompt_hash: str, digest: str) -> int:
    """The 64-bit word that stands for one lease on a board (never 0)."""
    key = "\0".join((salt, instance_id, request_id, prompt_hash, digest)).encode()
    word = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return word or 1


def bucket_of(word: int, num_slots: int) -> int:
    """The bucket ``word`` lives in (its first slot is ``bucket * BOARD_WAYS``)."""
    return word % (num_slots // BOARD_WAYS)


def board_verdict(bucket: npt.NDArray[np.uint64] | None, word: int) -> BoardVerdict:
    """What a bucket read after the data READ ended says: "mine" (the lease was live then)
    or why it proves nothing ("zero": no lease there, "other": other leases' words,
    "failed": the board READ did not complete)."""
    if bucket is None:
        return "failed"
    words = bucket.tolist()  # 8 Python ints: cheaper than numpy's comparisons at this size
    if word in words:
        return "mine"
    return "other" if any(words) else "zero"


class LeaseBoard:
    """Runs in a producer worker; owns the board's words and which lease holds which slot.

    Not locked: ``LeaseTable`` calls it under its own lock, in the same sections that start
    and end leases, so a word is 0 before the ended lease's id can reach the engine.
    """

    def __init__(self, num_slots: int, instance_id: str, salt: str | None = None) -> None:
        error = board_size_error(num_slots)
        if error is not None or num_slots == 0:
            raise ValueError(f"LeaseBoard: num_slots {error or 'must be > 0'}")
        self.words = np.zeros(num_slots, dtype=np.uint64)
        self.instance_id = instance_id
        self.salt = salt or secrets.token_hex(8)
        self._slots: dict[str, int] = {}  # request id -> its slot
        self.num_full = 0  # leases that found their bucket full (no slot: consumers ask)

    @property
    def num_slots(self) -> int:
        return int(self.words.size)

    @property
    def num_used(self) -> int:
        return len(self._slots)

    def info(self) -> LeaseBoardInfo:
        return LeaseBoardInfo(
            addr=int(self.words.ctypes.data), num_slots=self.num_slots, salt=self.salt
        )

    def word(self, request_id: str, prompt_hash: str, block_ids: Sequence[Sequence[int]]) -> int:
        digest = blocks_digest(block_ids)
        return lease_word(self.salt, self.instance_id, request_id, prompt_hash, digest)

    def post(
        self, request_id: str, prompt_hash: str, block_ids: Sequence[Sequence[int]]
    ) -> int | None:
        """Write a starting lease's word; its slot, or None (no block ids, or bucket full)."""
        if request_id in self._slots:
            raise ValueError(f"LeaseBoard: {request_id} holds slot {self._slots[request_id]}")
        if not any(block_ids):
            return None
        word = self.word(request_id, prompt_hash, block_ids)
        first = bucket_of(word, self.num_slots) * BOARD_WAYS
        free = np.flatnonzero(self.words[first : first + BOARD_WAYS] == 0)
        if free.size == 0:
            self.num_full += 1
            return None
        slot = first + int(free[0])
        self.words[slot] = word
        self._slots[request_id] = slot
        return slot

    def release(self, request_id: str) -> bool:
        """Zero an ended lease's word (before its blocks are freed); False if it had none."""
        slot = self._slots.pop(request_id, None)
        if slot is None:
            return False
        self.words[slot] = 0
        return True

    def clear(self) -> None:
        """Zero every word (shutdown)."""
        self.words[:] = 0
        self._slots.clear()

    def check_integrity(self, live: set[str]) -> None:
        """Words are set exactly on the slots of live leases, each in its word's bucket."""
        if not set(self._slots) <= live:
            raise IntegrityError("LeaseBoard: a lease that ended still holds a slot")
        used = {int(s) for s in np.flatnonzero(self.words)}
        if used != set(self._slots.values()) or len(used) != len(self._slots):
            raise IntegrityError("LeaseBoard: the words set differ from the slots held")
        for rid, slot in self._slots.items():
            if bucket_of(int(self.words[slot]), self.num_slots) != slot // BOARD_WAYS:
                raise IntegrityError(f"LeaseBoard: the word of {rid} is outside its bucket")


def register_board(transport: NixlTransport, board: LeaseBoard) -> RegDescs:
    """Register the board's words with NIXL (host memory) so consumers can READ them."""
    info = board.info()
    descs = transport.get_reg_descs([(info.addr, board.words.nbytes, 0, "")], "DRAM")
    transport.register_memory(descs)
    return descs
