"""NixlWrapper over real NIXL/UCX: a READ between two OS processes, notifications, no leaks."""

from __future__ import annotations

import multiprocessing as mp
import time
from multiprocessing.connection import Connection

import msgspec
import pytest
import torch

from kvbridge.nixl.transport import (
    LOCAL_AGENT,
    LiveCounts,
    NixlHandleError,
    NixlTransportError,
    XferHandle,
    XferState,
)
from kvbridge.nixl.wrapper import NixlWrapper
from support.nixl_marks import needs_nixl

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(60),
    needs_nixl,
]

BLOCK = 64 * 1024
NUM_BLOCKS = 16
# local block (reader) <- remote block (target); remote side non-contiguous, local scrambled
READ_PAIRS = [(0, 1), (5, 2), (6, 3), (9, 7), (2, 12), (15, 13)]
DEADLINE_S = 20.0
ZERO = LiveCounts(0, 0, 0, 0)


class TargetInfo(msgspec.Struct):
    agent_metadata: bytes
    base_addr: int


class TargetReport(msgspec.Struct):
    notifs: dict[str, list[bytes]]
    live_before_close: list[int]
    held_at_close: list[int]


def _pattern(num_blocks: int) -> torch.Tensor:
    values = torch.arange(num_blocks * BLOCK, dtype=torch.int64)
    blocks = values.view(num_blocks, BLOCK)
    return ((blocks * 7 + torch.arange(num_blocks).unsqueeze(1) * 31) % 251).to(torch.uint8)


def _target_main(conn: Connection) -> None:
    """Process A: registers a patterned tensor, publishes it, waits for B's notifications."""
    nixl = NixlWrapper("kvb-target")
    data = _pattern(NUM_BLOCKS).contiguous()
    reg = nixl.get_reg_descs([(data.data_ptr(), data.nbytes, 0)], "DRAM")
    nixl.register_memory(reg)
    conn.send_bytes(msgspec.msgpack.encode(TargetInfo(nixl.get_agent_metadata(), data.data_ptr())))

    notifs: dict[str, list[bytes]] = {}
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline and sum(len(v) for v in notifs.values()) < 2:
        for agent, msgs in nixl.get_new_notifs().items():
            notifs.setdefault(agent, []).extend(msgs)
        time.sleep(0.001)
    nixl.deregister_memory(reg)
    live = list(nixl.live_counts())
    held = list(nixl.close())
    conn.send_bytes(msgspec.msgpack.encode(TargetReport(notifs, live, held)))


def _wait_done(nixl: NixlWrapper, handle: XferHandle) -> XferState:
    deadline = time.monotonic() + DEADLINE_S
    state = nixl.check_xfer_state(handle)
    while state == "PROC" and time.monotonic() < deadline:
        state = nixl.check_xfer_state(handle)
    return state


def test_read_between_two_processes_with_notifications_and_no_leaks() -> None:
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    target = ctx.Process(target=_target_main, args=(theirs,), daemon=True)
    target.start()
    nixl = NixlWrapper("kvb-reader")
    try:
        assert ours.poll(DEADLINE_S), "target never published its metadata"
        info = msgspec.msgpack.decode(ours.recv_bytes(), type=TargetInfo)
        local = torch.zeros(NUM_BLOCKS * BLOCK, dtype=torch.uint8)
        reg = nixl.get_reg_descs([(local.data_ptr(), local.nbytes, 0)], "DRAM")
        nixl.register_memory(reg)
        remote_name = nixl.add_remote_agent(info.agent_metadata)
        assert remote_name == "kvb-target"

        blocks = range(NUM_BLOCKS)
        far = [(info.base_addr + b * BLOCK, BLOCK, 0) for b in blocks]
        near = [(local.data_ptr() + b * BLOCK, BLOCK, 0) for b in blocks]
        remote_dl = nixl.prep_xfer_dlist(remote_name, nixl.get_xfer_descs(far, "DRAM"))
        local_dl = nixl.prep_xfer_dlist(LOCAL_AGENT, nixl.get_xfer_descs(near, "DRAM"))
        local_idx, remote_idx = zip(*READ_PAIRS)
        xfer = nixl.make_prepped_xfer(
            "READ", local_dl, local_idx, remote_dl, remote_idx, notif_msg=b"xfer:req-1"
        )
        assert nixl.transfer(xfer) in ("PROC", "DONE")
        assert _wait_done(nixl, xfer) == "DONE"

        expected = _pattern(NUM_BLOCKS)
        got = local.view(NUM_BLOCKS, BLOCK)
        for dst, src in READ_PAIRS:
            assert torch.equal(got[dst], expected[src]), f"block {dst} != remote block {src}"
        untouched = sorted(set(blocks) - set(local_idx))
        assert int(got[untouched].count_nonzero()) == 0
        telemetry = nixl.get_xfer_telemetry(xfer)
        assert telemetry is not None
        assert telemetry.total_bytes == len(READ_PAIRS) * BLOCK
        assert 1 <= telemetry.desc_count <= len(READ_PAIRS)

        nixl.send_notif(remote_name, b"done:req-1")
        assert nixl.live_counts() == LiveCounts(1, 2, 1, 1)
        nixl.release_xfer_handle(xfer)
        nixl.release_dlist_handle(local_dl)
        nixl.release_dlist_handle(remote_dl)

        assert ours.poll(DEADLINE_S), "target never reported"
        report = msgspec.msgpack.decode(ours.recv_bytes(), type=TargetReport)
        nixl.remove_remote_agent(remote_name)
        nixl.deregister_memory(reg)
        assert nixl.live_counts() == ZERO
    finally:
        held = nixl.close()
        target.join(DEADLINE_S)
        if target.is_alive():
            target.kill()
    assert held == ZERO
    assert target.exitcode == 0
    assert sorted(report.notifs.get("kvb-reader", [])) == [b"done:req-1", b"xfer:req-1"]
    assert report.live_before_close == list(ZERO)
    assert report.held_at_close == list(ZERO)


def test_wrapper_rules_on_real_agents_in_one_process() -> None:
    a, b = NixlWrapper("kvb-a"), NixlWrapper("kvb-b", capture_telemetry=False)
    try:
        src, dst = (
            torch.ones(4 * BLOCK, dtype=torch.uint8),
            torch.zeros(4 * BLOCK, dtype=torch.uint8),
        )
        a.register_memory(a.get_reg_descs([(src.data_ptr(), src.nbytes, 0)], "DRAM"))
        b.register_memory(b.get_reg_descs([(dst.data_ptr(), dst.nbytes, 0)], "DRAM"))
        with pytest.raises(NixlTransportError) as err:  # remote not loaded yet
            b.prep_xfer_dlist("kvb-a", b.get_xfer_descs([(src.data_ptr(), BLOCK, 0)], "DRAM"))
        assert err.value.code == "NOT_FOUND"
        name = b.add_remote_agent(a.get_agent_metadata())
        far = b.prep_xfer_dlist(name, b.get_xfer_descs([(src.data_ptr(), BLOCK, 0)], "DRAM"))
        near = b.prep_xfer_dlist("", b.get_xfer_descs([(dst.data_ptr(), BLOCK, 0)], "DRAM"))
        with pytest.raises(NixlTransportError) as err:
            b.make_prepped_xfer("READ", near, [0], far, [3])
        assert err.value.code == "INVALID_PARAM"
        xfer = b.make_prepped_xfer("WRITE", near, [0], far, [0])
        with pytest.raises(NixlTransportError) as err:
            b.check_xfer_state(xfer)
        assert err.value.code == "NOT_POSTED"
        b.transfer(xfer)
        assert _wait_done(b, xfer) == "DONE"
        assert int(src.count_nonzero()) == 3 * BLOCK  # zeros written over the first block
        assert b.get_xfer_telemetry(xfer) is None
        b.release_xfer_handle(xfer)
        with pytest.raises(NixlHandleError):
            b.release_xfer_handle(xfer)
        assert b.live_counts() == LiveCounts(0, 2, 1, 1)
    finally:
        held_b, held_a = b.close(), a.close()
    assert held_b == LiveCounts(0, 2, 1, 1)  # close released what the test left behind
    assert held_a == LiveCounts(0, 0, 1, 0)
    assert b.close() == ZERO
