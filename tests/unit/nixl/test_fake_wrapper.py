"""FakeNixlWrapper: SPEC §4 semantics plus the NIXL rules and fault injection it adds."""

from __future__ import annotations

import pytest

from kvbridge.nixl.fake import FakeNixlWrapper
from kvbridge.nixl.transport import (
    LOCAL_AGENT,
    DlistHandle,
    LiveCounts,
    NixlHandleError,
    NixlTransport,
    NixlTransportError,
    XferHandle,
)

BASE = 0x10000
BLOCK = 4096


def _ready(
    cycles: int = 0, num_blocks: int = 8
) -> tuple[FakeNixlWrapper, DlistHandle, DlistHandle]:
    """A fake with registered local memory, a loaded remote and both dlists prepared."""
    fake = FakeNixlWrapper("d", cycles_before_xfer_done=cycles)
    fake.register_memory(fake.get_reg_descs([(BASE, num_blocks * BLOCK, 0)], "DRAM"))
    remote = fake.add_remote_agent(b"peer-metadata")
    blocks = [(BASE + i * BLOCK, BLOCK, 0) for i in range(num_blocks)]
    local = fake.prep_xfer_dlist(LOCAL_AGENT, fake.get_xfer_descs(blocks, "DRAM"))
    far = [(0x90000 + i * BLOCK, BLOCK, 0) for i in range(num_blocks)]
    remote_dl = fake.prep_xfer_dlist(remote, fake.get_xfer_descs(far, "DRAM"))
    return fake, local, remote_dl


def _xfer(fake: FakeNixlWrapper, local: DlistHandle, remote: DlistHandle) -> XferHandle:
    return fake.make_prepped_xfer("READ", local, [0, 1], remote, [2, 3])


def test_is_a_transport_with_spec_constants() -> None:
    fake = FakeNixlWrapper()
    assert isinstance(fake, NixlTransport)
    assert fake.get_agent_metadata() == FakeNixlWrapper.AGENT_METADATA
    assert fake.add_remote_agent(b"x") == fake.add_remote_agent(b"y") == "fake-remote"
    assert fake.get_new_notifs() == {}


def test_descriptors_are_unique_per_item_even_for_same_memory() -> None:
    fake = FakeNixlWrapper()
    items = [(BASE, BLOCK, 0), (BASE, BLOCK, 0), (BASE + BLOCK, BLOCK, 0)]
    reg = fake.get_reg_descs(items, "DRAM")
    xfer = fake.get_xfer_descs(items, "DRAM")
    assert len(reg) == len(xfer) == 3
    assert len(set(reg) | set(xfer)) == 6
    assert [d.addr for d in xfer] == [BASE, BASE, BASE + BLOCK]


def test_handles_are_fresh_unique_ints() -> None:
    fake, local, remote = _ready()
    handles = [_xfer(fake, local, remote) for _ in range(5)]
    more = fake.prep_xfer_dlist(LOCAL_AGENT, fake.get_xfer_descs([(BASE, BLOCK, 0)], "DRAM"))
    everything = [local, remote, more, *handles]
    assert all(type(h) is int for h in everything)
    assert len(set(everything)) == len(everything)


def test_proc_then_done_after_n_polls_counted_per_handle() -> None:
    fake, local, remote = _ready(cycles=3)
    a, b = _xfer(fake, local, remote), _xfer(fake, local, remote)
    assert fake.transfer(a) == "PROC"
    assert fake.transfer(b) == "PROC"
    seen_a, seen_b = [], []
    for _ in range(4):  # interleaved: a's polls must not advance b
        seen_a.append(fake.check_xfer_state(a))
        seen_a.append(fake.check_xfer_state(a))
        seen_b.append(fake.check_xfer_state(b))
    assert seen_a == ["PROC"] * 3 + ["DONE"] * 5
    assert seen_b == ["PROC"] * 3 + ["DONE"]


def test_zero_cycles_done_on_first_poll_and_repost_restarts() -> None:
    fake, local, remote = _ready(cycles=1)
    h = _xfer(fake, local, remote)
    fake.transfer(h)
    assert [fake.check_xfer_state(h) for _ in range(2)] == ["PROC", "DONE"]
    assert fake.transfer(h) == "PROC"
    assert fake.check_xfer_state(h) == "PROC"
    with pytest.raises(NixlTransportError, match="in flight") as err:
        fake.transfer(h)
    assert err.value.code == "REPOST_ACTIVE"
    assert FakeNixlWrapper("x").cycles_before_xfer_done == 0


def test_poll_before_post_is_an_error() -> None:
    fake, local, remote = _ready()
    with pytest.raises(NixlTransportError) as err:
        fake.check_xfer_state(_xfer(fake, local, remote))
    assert err.value.code == "NOT_POSTED"


def test_forced_err_on_poll_and_on_post() -> None:
    fake, local, remote = _ready(cycles=5)
    bad, good = _xfer(fake, local, remote), _xfer(fake, local, remote)
    fake.transfer(bad)
    fake.transfer(good)
    assert fake.check_xfer_state(bad) == "PROC"
    fake.fail_xfer(bad)
    assert fake.check_xfer_state(bad) == "ERR"
    assert fake.check_xfer_state(good) == "PROC"

    early = _xfer(fake, local, remote)
    fake.fail_xfer(early, on_post=True)
    assert fake.transfer(early) == "ERR"
    assert fake.check_xfer_state(early) == "ERR"


def test_fail_next_xfers_hits_exactly_the_next_n() -> None:
    fake, local, remote = _ready()
    fake.fail_next_xfers(2)
    handles = [_xfer(fake, local, remote) for _ in range(3)]
    for h in handles:
        fake.transfer(h)
    assert [fake.check_xfer_state(h) for h in handles] == ["ERR", "ERR", "DONE"]


def test_records_calls_with_args_and_kwargs() -> None:
    fake, local, remote = _ready()
    h = fake.make_prepped_xfer("READ", local, [1], remote, [4], notif_msg=b"req-1")
    fake.transfer(h)
    assert fake.calls_to("make_prepped_xfer") == [
        (("READ", local, [1], remote, [4]), {"notif_msg": b"req-1"})
    ]
    assert fake.calls_to("transfer") == [((h,), {})]
    names = [name for name, _, _ in fake.calls]
    assert names[:2] == ["get_reg_descs", "register_memory"]
    assert names[-2:] == ["make_prepped_xfer", "transfer"]


def test_double_release_and_unknown_handles_raise() -> None:
    fake, local, remote = _ready()
    h = _xfer(fake, local, remote)
    fake.release_xfer_handle(h)
    with pytest.raises(NixlHandleError):
        fake.release_xfer_handle(h)
    with pytest.raises(NixlHandleError):
        fake.check_xfer_state(h)
    fake.release_dlist_handle(local)
    with pytest.raises(NixlHandleError):
        fake.release_dlist_handle(local)
    with pytest.raises(NixlHandleError):
        fake.make_prepped_xfer("READ", local, [0], remote, [0])
    with pytest.raises(NixlHandleError):
        fake.release_xfer_handle(XferHandle(10_000))


def test_leak_counters_track_create_and_release() -> None:
    fake = FakeNixlWrapper()
    reg = fake.get_reg_descs([(BASE, BLOCK, 0), (BASE + BLOCK, BLOCK, 0)], "DRAM")
    fake.register_memory(reg)
    remote = fake.add_remote_agent(b"m")
    local = fake.prep_xfer_dlist("", fake.get_xfer_descs([(BASE, BLOCK, 0)], "DRAM"))
    far = fake.prep_xfer_dlist(remote, fake.get_xfer_descs([(7 * BLOCK, BLOCK, 0)], "DRAM"))
    h = fake.make_prepped_xfer("WRITE", local, [0], far, [0])
    assert fake.live_counts() == LiveCounts(1, 2, 2, 1)
    fake.release_xfer_handle(h)
    fake.release_dlist_handle(local)
    fake.release_dlist_handle(far)
    fake.remove_remote_agent(remote)
    fake.deregister_memory(reg)
    assert fake.live_counts() == LiveCounts(0, 0, 0, 0)
    with pytest.raises(NixlHandleError):
        fake.deregister_memory(reg)


def test_close_reports_leaks_is_idempotent_and_refuses_later_calls() -> None:
    fake, local, remote = _ready()
    _xfer(fake, local, remote)
    assert fake.close() == LiveCounts(1, 2, 1, 1)
    assert fake.close() == LiveCounts(0, 0, 0, 0)
    with pytest.raises(NixlTransportError, match="closed"):
        fake.get_new_notifs()


def test_notifications_delivered_once_and_sent_ones_recorded() -> None:
    fake, local, remote = _ready()
    fake.deliver_notif("p0", b"done:req-1")
    fake.deliver_notif("p0", b"done:req-2")
    fake.deliver_notif("p1", b"hb")
    assert fake.get_new_notifs() == {"p0": [b"done:req-1", b"done:req-2"], "p1": [b"hb"]}
    assert fake.get_new_notifs() == {}

    fake.send_notif(fake.REMOTE_AGENT_NAME, b"heartbeat")
    h = fake.make_prepped_xfer("READ", local, [0], remote, [0], notif_msg=b"req-9")
    fake.transfer(h)
    assert fake.sent_notifs == [("fake-remote", b"heartbeat")]
    assert fake.check_xfer_state(h) == "DONE"
    assert fake.sent_notifs[-1] == ("fake-remote", b"req-9")
    with pytest.raises(NixlTransportError, match="not loaded"):
        fake.send_notif("nobody", b"x")


def test_enforces_nixl_rules_on_memory_and_transfers() -> None:
    fake, local, remote = _ready(num_blocks=2)
    outside = fake.get_xfer_descs([(BASE + BLOCK, 2 * BLOCK, 0)], "DRAM")
    with pytest.raises(NixlTransportError, match="outside registered memory"):
        fake.prep_xfer_dlist(LOCAL_AGENT, outside)
    with pytest.raises(NixlTransportError, match="not loaded"):
        fake.prep_xfer_dlist("stranger", outside)
    bad_calls = [
        (local, [0], remote, [0, 1]),  # count mismatch
        (local, [], remote, []),  # empty
        (local, [2], remote, [0]),  # out of range
        (remote, [0], local, [0]),  # sides swapped
    ]
    for args in bad_calls:
        with pytest.raises(NixlTransportError) as err:
            fake.make_prepped_xfer("READ", *args)
        assert err.value.code == "INVALID_PARAM"
    with pytest.raises(ValueError, match="op"):
        fake.make_prepped_xfer("COPY", local, [0], remote, [0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="memory_type"):
        fake.get_xfer_descs([(BASE, BLOCK, 0)], "HBM")  # type: ignore[arg-type]
    fake.remove_remote_agent(fake.REMOTE_AGENT_NAME)
    with pytest.raises(NixlTransportError, match="not loaded"):
        fake.make_prepped_xfer("READ", local, [0], remote, [0])


def test_injected_call_failure_raises_once() -> None:
    fake = FakeNixlWrapper()
    fake.fail_next_call("add_remote_agent")
    with pytest.raises(NixlTransportError, match="injected"):
        fake.add_remote_agent(b"m")
    assert fake.add_remote_agent(b"m") == fake.REMOTE_AGENT_NAME
    fake.fail_next_call("send_notif", ConnectionError("peer gone"))
    with pytest.raises(ConnectionError):
        fake.send_notif(fake.REMOTE_AGENT_NAME, b"x")
    with pytest.raises(ValueError, match="not a transport method"):
        fake.fail_next_call("nonexistent")


def test_telemetry_counts_bytes_and_merged_runs() -> None:
    fake, local, remote = _ready()
    # local 0,1 contiguous and remote 2,3 contiguous -> one run; then 5 -> a second run
    h = fake.make_prepped_xfer("READ", local, [0, 1, 5], remote, [2, 3, 6])
    fake.transfer(h)
    assert fake.check_xfer_state(h) == "DONE"
    telemetry = fake.get_xfer_telemetry(h)
    assert telemetry.total_bytes == 3 * BLOCK
    assert telemetry.desc_count == 2
    assert telemetry.xfer_duration_us >= 0


def test_rejects_bad_constructor_and_foreign_descriptors() -> None:
    with pytest.raises(ValueError, match="cycles_before_xfer_done"):
        FakeNixlWrapper(cycles_before_xfer_done=-1)
    assert FakeNixlWrapper("x", backends=["UCX"], num_threads=4).agent_name == "x"
    fake = FakeNixlWrapper()
    with pytest.raises(TypeError):
        fake.register_memory([(BASE, BLOCK, 0)])
