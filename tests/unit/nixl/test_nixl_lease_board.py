"""The lease board's pieces alone: words, the slot allocator, the verdict, the handshake field,
the setting, and ``LeaseTable`` writing and zeroing words as leases start and end."""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
import pytest
from nixl_helpers import config

from kvbridge.config import ConfigError
from kvbridge.connector.types import IntegrityError
from kvbridge.nixl.handshake import NixlAgentMetadata
from kvbridge.nixl.lease_board import (
    BOARD_WAYS,
    LeaseBoard,
    LeaseBoardInfo,
    board_verdict,
    bucket_of,
    lease_word,
)
from kvbridge.nixl.leases import LeaseTable
from kvbridge.nixl.metadata import SendSpec, blocks_digest
from kvbridge.nixl.settings import NixlSettings

BLOCKS = ([5, 6, 7],)


def board(num_slots: int = 64) -> LeaseBoard:
    return LeaseBoard(num_slots, "prefill-r0-abcd", salt="s1")


def send(rid: str = "p-1", block_ids: tuple[list[int], ...] = BLOCKS, ph: str = "h") -> SendSpec:
    return SendSpec(
        request_id=rid,
        num_blocks=sum(map(len, block_ids)),
        lease_duration_s=30.0,
        abort_timeout_s=60.0,
        block_ids=block_ids,
        prompt_hash=ph,
    )


# -- words ---------------------------------------------------------------------------------------
def test_the_consumer_computes_the_producers_word_from_what_it_knows() -> None:
    b = board()
    mine = lease_word("s1", "prefill-r0-abcd", "p-1", "h", blocks_digest(BLOCKS))
    assert b.word("p-1", "h", BLOCKS) == mine != 0


@pytest.mark.parametrize(
    "other",
    [
        ("s2", "prefill-r0-abcd", "p-1", "h", BLOCKS),  # another board (salt)
        ("s1", "prefill-r0-ffff", "p-1", "h", BLOCKS),  # another producer instance
        ("s1", "prefill-r0-abcd", "p-2", "h", BLOCKS),  # another request
        ("s1", "prefill-r0-abcd", "p-1", "g", BLOCKS),  # another prompt
        ("s1", "prefill-r0-abcd", "p-1", "h", ([5, 6, 8],)),  # other blocks (a reused id)
        ("s1", "prefill-r0-abcd", "p-1", "h", ([5, 6], [7])),  # same ids, other groups
    ],
)
def test_any_other_lease_identity_gives_another_word(other: tuple[Any, ...]) -> None:
    salt, instance, rid, ph, blocks = other
    mine = lease_word("s1", "prefill-r0-abcd", "p-1", "h", blocks_digest(BLOCKS))
    assert lease_word(salt, instance, rid, ph, blocks_digest(blocks)) != mine


# -- the slot allocator --------------------------------------------------------------------------
def test_a_word_lives_in_its_bucket_until_released_exactly_once() -> None:
    b = board()
    slot = b.post("p-1", "h", BLOCKS)
    assert slot is not None and b.num_used == 1
    word = b.word("p-1", "h", BLOCKS)
    assert slot // BOARD_WAYS == bucket_of(word, b.num_slots) and int(b.words[slot]) == word
    b.check_integrity({"p-1"})
    with pytest.raises(ValueError, match="holds slot"):
        b.post("p-1", "h", BLOCKS)
    assert b.release("p-1") is True
    assert b.release("p-1") is False  # once only: a second release touches nothing
    assert not b.words.any() and b.num_used == 0
    b.check_integrity(set())


def test_a_full_bucket_gives_no_slot_and_a_freed_one_is_reused() -> None:
    b = board(num_slots=BOARD_WAYS)  # one bucket: every word lands in it
    for i in range(BOARD_WAYS):
        assert b.post(f"p-{i}", "h", BLOCKS) == i
    assert b.post("late", "h", BLOCKS) is None and b.num_full == 1
    b.check_integrity({f"p-{i}" for i in range(BOARD_WAYS)})
    b.release("p-3")
    assert b.post("late", "h", BLOCKS) == 3  # the freed slot, with the new lease's word
    assert int(b.words[3]) == b.word("late", "h", BLOCKS) != b.word("p-3", "h", BLOCKS)


def test_a_lease_without_block_ids_gets_no_word() -> None:
    b = board()
    assert b.post("p-1", "h", ()) is None and b.post("p-2", "h", ([],)) is None
    assert b.num_used == 0 and b.num_full == 0


def test_integrity_catches_a_word_left_behind_and_a_slot_of_an_ended_lease() -> None:
    b = board()
    b.post("p-1", "h", BLOCKS)
    with pytest.raises(IntegrityError, match="ended"):
        b.check_integrity(set())
    b.release("p-1")
    b.words[9] = 12345  # a word nobody owns (a release that forgot to zero it)
    with pytest.raises(IntegrityError, match="differ"):
        b.check_integrity(set())


@pytest.mark.parametrize("slots", [0, 7, 12, -8, 1 << 21])
def test_a_bad_board_size_is_refused(slots: int) -> None:
    with pytest.raises(ValueError, match="num_slots"):
        LeaseBoard(slots, "x")


# -- the verdict ---------------------------------------------------------------------------------
def test_only_the_loads_own_word_in_its_bucket_proves_anything() -> None:
    word = 0xDEADBEEF12345678
    bucket = np.zeros(BOARD_WAYS, dtype=np.uint64)
    assert board_verdict(bucket, word) == "zero"
    bucket[2] = word ^ 1
    assert board_verdict(bucket, word) == "other"
    bucket[5] = word
    assert board_verdict(bucket, word) == "mine"
    assert board_verdict(None, word) == "failed"


# -- handshake and settings ----------------------------------------------------------------------
def test_board_info_problems_are_named() -> None:
    good = LeaseBoardInfo(addr=4096, num_slots=64, salt="s")
    assert good.problem() is None and len(good.items()) == 64 // BOARD_WAYS
    assert good.items()[1] == (4096 + 8 * BOARD_WAYS, 8 * BOARD_WAYS, 0)
    for bad, words in (
        (msgspec.structs.replace(good, ways=4), "words per bucket"),
        (msgspec.structs.replace(good, num_slots=12), "12 slots"),
        (msgspec.structs.replace(good, num_slots=0), "0 slots"),
        (msgspec.structs.replace(good, addr=4097), "aligned"),
        (msgspec.structs.replace(good, salt=""), "salt"),
    ):
        assert words in (bad.problem() or "")


def test_the_board_is_an_optional_handshake_field_both_ways() -> None:
    md = NixlAgentMetadata(
        engine_id="p",
        tp_rank=0,
        agent_metadata=b"a",
        layer_names=["l0"],
        kv_base_addrs=[1],
        block_len=8,
        block_stride=8,
        block_size=4,
        layout="BLOCKS_FIRST",
        num_blocks=1,
        dtype="float32",
        num_layers=1,
        memory_type="DRAM",
        device_id=0,
        kv_buffer_device="cuda",
    )
    old = msgspec.msgpack.encode(md)  # a producer without a board
    assert msgspec.msgpack.decode(old, type=NixlAgentMetadata).lease_board is None
    info = LeaseBoardInfo(addr=4096, num_slots=64, salt="s")
    new = msgspec.msgpack.encode(msgspec.structs.replace(md, lease_board=info))
    assert msgspec.msgpack.decode(new, type=NixlAgentMetadata).lease_board == info

    class OlderConsumersView(msgspec.Struct):  # what a consumer predating the board decodes
        engine_id: str
        num_blocks: int

    assert msgspec.msgpack.decode(new, type=OlderConsumersView).engine_id == "p"


@pytest.mark.parametrize("value", [7, 12, -8, 1 << 21, True, "64"])
def test_a_bad_lease_board_slots_setting_is_a_config_error_naming_the_key(value: Any) -> None:
    with pytest.raises(ConfigError, match="lease_board_slots"):
        NixlSettings.from_config(config("kv_producer", "p", lease_board_slots=value))
    assert NixlSettings.from_config(config("kv_producer", "p", lease_board_slots=0))


# -- LeaseTable ----------------------------------------------------------------------------------
def _table() -> tuple[LeaseTable, LeaseBoard]:
    table, b = LeaseTable(), board()
    table.attach_board(b)
    return table, b


@pytest.mark.parametrize("end", ["done", "release", "expire", "clear"])
def test_a_leases_word_is_zero_before_its_id_can_be_handed_to_the_engine(end: str) -> None:
    table, b = _table()
    table.start(send(), now=0.0)
    word = b.word("p-1", "h", BLOCKS)
    assert word in b.words.tolist() and table.num_live == 1
    table.check_integrity()
    if end in ("done", "release"):
        table.complete("p-1", now=1.0, kind=end)  # type: ignore[arg-type]
    elif end == "expire":
        table.expire(now=31.0, early_ttl_s=60.0)
    else:
        table.clear()
    assert not b.words.any() and b.num_used == 0  # before take_finished reports it
    table.check_integrity()
    if end != "clear":
        assert table.take_finished({"p-1"}) == {"p-1"}


def test_an_early_done_never_writes_a_word_and_a_board_comes_before_leases() -> None:
    table, b = _table()
    table.complete("p-1", now=0.0)  # the consumer's "done" overtook the SendSpec
    table.start(send(), now=0.1)
    assert not b.words.any() and table.take_finished({"p-1"}) == {"p-1"}
    table.start(send("p-2"), now=0.2)
    with pytest.raises(RuntimeError, match="before any lease"):
        table.attach_board(board())
