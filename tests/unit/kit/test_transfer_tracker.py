"""TransferTracker: one test per bullet of its module docstring, with a scripted connector."""

from __future__ import annotations

from typing import Any

import pytest

from kvbridge.config import TransferConfig
from kvbridge.connector.base import (
    ConnectorOutput,
    EmptyMetadata,
    KVConnectorScheduler,
    SupportsHMA,
)
from kvbridge.connector.types import (
    BlockIds,
    FinishedRequest,
    IntegrityError,
    KVCacheSpec,
    MatchResult,
    RequestView,
    SchedulerStep,
    SimpleRequest,
)
from kvbridge.kit.transfers import Admission, ConnectorContractError, TransferTracker, _Hold

BS = 4


class Scripted(KVConnectorScheduler):
    """Answers each hook as set on it; records the calls."""

    def __init__(self, match: int | None = 0, load_async: bool = False, delay_free: bool = False):
        spec = KVCacheSpec(
            block_size=BS, num_blocks=16, num_layers=1, num_kv_heads=1, head_dim=2, dtype="float32"
        )
        super().__init__(TransferConfig(kv_connector="Scripted"), spec)
        self.match, self.load_async, self.delay_free = match, load_async, delay_free
        self.calls: list[tuple[str, Any]] = []

    def get_num_new_matched_tokens(self, request: RequestView, num_computed: int) -> MatchResult:
        return MatchResult(self.match, self.load_async)

    def update_state_after_alloc(self, request: RequestView, b: BlockIds, n: int) -> None:
        self.calls.append(("alloc", (request.request_id, b, n)))

    def build_connector_meta(self, step: SchedulerStep) -> EmptyMetadata:
        self.calls.append(("meta", step))
        return EmptyMetadata()

    def update_connector_output(self, output: ConnectorOutput) -> None:
        self.calls.append(("output", output))

    def request_finished(self, request: RequestView, block_ids: list[int]) -> FinishedRequest:
        self.calls.append(("finished", (request.request_id, block_ids)))
        return FinishedRequest(self.delay_free, {"from": "scripted"} if self.delay_free else None)


class ScriptedHMA(Scripted, SupportsHMA):
    def request_finished_all_groups(
        self, request: RequestView, block_ids: BlockIds
    ) -> FinishedRequest:
        self.calls.append(("finished_all", (request.request_id, block_ids)))
        return FinishedRequest(False, None)


def req(rid: str = "r", n: int = 12) -> SimpleRequest:
    return SimpleRequest(rid, list(range(n)))


def admit(t: TransferTracker, r: SimpleRequest, blocks: BlockIds, local: int = 0) -> Admission:
    admission = t.match(r, local)
    assert admission is not None
    t.allocated(r, blocks, local, admission)
    return admission


def out(**kw: Any) -> ConnectorOutput:
    return ConnectorOutput(**{k: frozenset(v) for k, v in kw.items()})


def test_an_async_load_parks_the_request_until_finished_recving() -> None:
    t = TransferTracker(Scripted(match=8, load_async=True), BS)
    r = req()
    assert admit(t, r, ([1, 2, 3],)) == Admission(8, True)
    assert t.is_loading("r") and t.num_external_tokens("r") == 8
    assert t.update(out()).loaded == ()
    report = t.update(out(finished_recving={"r"}))
    assert [(o.request_id, o.num_computed_tokens, o.error) for o in report.loaded] == [
        ("r", 8, None)
    ]
    assert not t.is_loading("r")


def test_delay_free_holds_blocks_until_finished_sending() -> None:
    conn = Scripted(delay_free=True)
    t = TransferTracker(conn, BS)
    r = req()
    admit(t, r, ([1, 2, 3],))
    assert t.update(out(finished_sending={"r"})).freed == ()  # not finished yet: ignored
    done = t.finish(r, ([1, 2, 3],))
    assert done == (False, {"from": "scripted"}) and t.is_held("r") and t.num_held == 1
    assert ("finished", ("r", [1, 2, 3])) in conn.calls
    assert t.update(out()).freed == ()
    assert t.update(out(finished_sending={"r"})).freed == ("r",)
    assert not t.is_held("r") and t.num_held == 0


def test_a_request_finished_mid_load_keeps_its_blocks_until_finished_recving() -> None:
    t = TransferTracker(Scripted(match=8, load_async=True, delay_free=True), BS)
    r = req()
    admit(t, r, ([1, 2, 3],))
    assert t.finish(r, ([1, 2, 3],)).free_now is False
    assert not t.is_loading("r")
    # Both waits must end: the load's finished_recving and the send's finished_sending.
    report = t.update(out(finished_recving={"r"}))
    assert report.loaded == () and report.freed == ()
    assert t.update(out(finished_sending={"r"})).freed == ("r",)


def test_a_finish_with_nothing_in_flight_frees_at_once() -> None:
    t = TransferTracker(Scripted(), BS)
    r = req()
    admit(t, r, ([1, 2, 3],))
    assert t.finish(r, ([1, 2, 3],)) == (True, None)
    assert t.num_held == 0


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_a_same_step_load_rolls_back_to_its_first_failed_block(policy: str) -> None:
    t = TransferTracker(Scripted(match=8), BS, policy)
    r = req()
    admit(t, r, ([5, 6, 7],), local=0)  # block 6 holds tokens 4..7
    report = t.update(out(invalid_block_ids={6, 99}))
    [o] = report.rolled_back
    assert (o.num_computed_tokens, o.num_external_tokens) == (4, 4)
    assert report.invalid_block_ids == {6, 99}
    assert (o.error is None) == (policy == "recompute")
    if o.error is not None:
        assert "kv_load_failure_policy=fail" in o.error
    assert t.num_external_tokens("r") == 4


def test_a_same_step_load_without_errors_is_not_reported() -> None:
    t = TransferTracker(Scripted(match=8), BS)
    admit(t, req(), ([5, 6, 7],))
    assert t.update(out(invalid_block_ids={7})).rolled_back == ()  # 7 holds tokens 8.., computed


def test_errors_reported_before_finished_recving_count_for_the_parked_load() -> None:
    t = TransferTracker(Scripted(match=8, load_async=True), BS)
    admit(t, req(), ([5, 6, 7],), local=0)
    t.update(out(invalid_block_ids={5}))
    [o] = t.update(out(finished_recving={"r"})).loaded
    assert (o.num_computed_tokens, o.num_external_tokens) == (0, 0)


def test_errors_on_blocks_of_no_parked_load_are_forgotten() -> None:
    t = TransferTracker(Scripted(match=8, load_async=True), BS)
    t.update(out(invalid_block_ids={5}))  # before the request even matched
    admit(t, req(), ([5, 6, 7],))
    [o] = t.update(out(finished_recving={"r"})).loaded
    assert o.num_computed_tokens == 8


def test_a_local_prefix_hit_bounds_the_failed_range() -> None:
    t = TransferTracker(Scripted(match=4), BS)
    admit(t, req(), ([5, 6, 7],), local=4)  # block 5 was a local hit, 6 loaded
    assert t.update(out(invalid_block_ids={5})).rolled_back == ()
    admit(t, req("s"), ([8, 9, 10],), local=4)
    [o] = t.update(out(invalid_block_ids={9})).rolled_back
    assert (o.request_id, o.num_computed_tokens, o.num_external_tokens) == ("s", 4, 0)


def test_external_tokens_count_from_the_first_admission_only() -> None:
    conn = Scripted(match=4)
    t = TransferTracker(conn, BS)
    r = req()
    admit(t, r, ([1, 2, 3],))
    conn.match = 8
    admit(t, r, ([1, 2, 3],))  # re-admitted after a preemption: still counts 4
    assert t.num_external_tokens("r") == 4


def test_match_checks_the_contract() -> None:
    t = TransferTracker(Scripted(match=12), BS)
    with pytest.raises(ConnectorContractError, match="last token"):
        t.match(req(n=12), 0)
    assert TransferTracker(Scripted(match=None), BS).match(req(), 0) is None
    assert TransferTracker(Scripted(match=0, load_async=True), BS).match(req(), 0) == (0, False)
    assert TransferTracker(None, BS).match(req(), 4) == (0, False)


def test_steps_carry_ids_finished_since_the_last_step_and_drop_preempted_loads() -> None:
    conn = Scripted(match=8)
    t = TransferTracker(conn, BS)
    r, s = req("r"), req("s")
    admit(t, r, ([1, 2, 3],))
    t.finish(req("x"), ([],))
    step, meta = t.build_step([], preempted_req_ids=["r"])
    assert (step.step_id, step.finished_req_ids, step.preempted_req_ids) == (0, {"x"}, {"r"})
    assert isinstance(meta, EmptyMetadata) and conn.calls[-1] == ("meta", step)
    admit(t, s, ([4, 5, 6],))
    step, _ = t.build_step([])
    assert (step.step_id, step.finished_req_ids) == (1, frozenset())
    assert [o.request_id for o in t.update(out(invalid_block_ids={1, 4})).rolled_back] == ["s"]
    assert TransferTracker(None, BS).build_step([])[1] is None


def test_several_groups_use_the_earliest_failed_token_and_the_hma_finish() -> None:
    conn = ScriptedHMA(match=8)
    t = TransferTracker(conn, BS)
    r = req()
    admit(t, r, ([1, 2, 3], [4, 5, 6]))
    [o] = t.update(out(invalid_block_ids={2, 4})).rolled_back
    assert o.num_computed_tokens == 0
    t.finish(r, ([1, 2, 3], [4, 5, 6]))
    assert conn.calls[-1] == ("finished_all", ("r", ([1, 2, 3], [4, 5, 6])))
    with pytest.raises(ConnectorContractError, match="HMA"):
        TransferTracker(Scripted(), BS).finish(req(), ([1], [2]))


def test_check_integrity_catches_a_request_in_two_states() -> None:
    t = TransferTracker(Scripted(match=8, load_async=True), BS)
    admit(t, req(), ([1, 2, 3],))
    t.check_integrity()
    t._held["r"] = _Hold(wait_send=True, wait_recv=False)  # a bug: parked and held
    with pytest.raises(IntegrityError, match="two states"):
        t.check_integrity()


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="kv_load_failure_policy"):
        TransferTracker(None, BS, "retry")
    with pytest.raises(ValueError, match="block_size"):
        TransferTracker(None, 0)
