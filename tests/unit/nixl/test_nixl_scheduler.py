"""NixlScheduler: the consumer's load plans and the producer's delayed frees."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from dataclasses import replace
from typing import Any

import pytest
from nixl_helpers import BLOCK_SIZE, config, request, spec

from kvbridge.connector.base import ConnectorOutput, KVConnectorRole
from kvbridge.connector.factory import create_connector
from kvbridge.connector.types import SchedulerStep
from kvbridge.nixl.connector import NixlConnector
from kvbridge.nixl.metadata import NixlConnectorMetadata
from kvbridge.nixl.scheduler import NixlScheduler


def scheduler(role: str = "kv_both", groups: int = 1, **extra: Any) -> NixlScheduler:
    extra.setdefault("side_channel_port", 5600)
    sched = create_connector(config(role, "eng", **extra), KVConnectorRole.SCHEDULER, spec(groups))
    assert isinstance(sched, NixlScheduler)
    return sched


def remote_params(n_tokens: int, **over: Any) -> dict[str, Any]:
    n_blocks = -(-n_tokens // BLOCK_SIZE)
    params: dict[str, Any] = {
        "do_remote_prefill": True,
        "remote_engine_id": "prefill",
        "remote_host": "127.0.0.1",
        "remote_port": 5601,
        "remote_block_ids": list(range(100, 100 + n_blocks)),
        "remote_request_id": "p-1",
        "tp_size": 1,
    }
    params.update(over)
    return params


def meta(sched: NixlScheduler, step: int = 0, **kw: Any) -> NixlConnectorMetadata:
    out = sched.build_connector_meta(SchedulerStep(step_id=step, **kw))
    assert isinstance(out, NixlConnectorMetadata)
    sched.check_integrity()
    return out


# -- consumer ----------------------------------------------------------------------------------
def test_remote_prefill_loads_every_prompt_token_but_the_last_once() -> None:
    sched = scheduler()
    req = request("d-1", 10, remote_params(10))  # 3 blocks, the last one partial
    assert sched.get_num_new_matched_tokens(req, 0) == (9, True)
    sched.update_state_after_alloc(req, ([7, 8, 2],), 9)
    sched.update_state_after_alloc(req, ([7, 8, 2],), 0)  # second call for an async load
    first = meta(sched)
    spec_ = first.reqs_to_recv["d-1"]
    assert spec_.local_block_ids == ([7, 8, 2],)
    assert spec_.remote_block_ids == ([100, 101, 102],)
    assert (spec_.remote_engine_id, spec_.remote_port, spec_.remote_request_id) == (
        "prefill",
        5601,
        "p-1",
    )
    assert spec_.fail_reason is None
    assert meta(sched, 1).reqs_to_recv == {}  # shipped once
    assert sched.num_waiting_for_remote_kv == 1
    assert sched.get_num_new_matched_tokens(req, 9) == (0, False)  # never matched again
    sched.update_connector_output(ConnectorOutput(finished_recving=frozenset({"d-1"})))
    assert sched.num_waiting_for_remote_kv == 0
    assert sched.request_finished(req, [7, 8, 2]) == (False, None)
    assert not sched.has_request_state("d-1")


def test_local_prefix_hit_loads_only_the_remaining_blocks() -> None:
    sched = scheduler()
    req = request("d-2", 13, remote_params(13))  # 4 blocks
    assert sched.get_num_new_matched_tokens(req, 8) == (4, True)
    sched.update_state_after_alloc(req, ([1, 2, 3, 4],), 4)
    spec_ = meta(sched).reqs_to_recv["d-2"]
    assert spec_.local_block_ids == ([3, 4],) and spec_.remote_block_ids == ([102, 103],)


def test_prompt_fully_cached_locally_loads_nothing_and_releases_the_producer() -> None:
    sched = scheduler()
    req = request("d-3", 9, remote_params(9))
    assert sched.get_num_new_matched_tokens(req, 8) == (0, False)
    sched.update_state_after_alloc(req, ([1, 2, 3],), 0)
    m = meta(sched)
    assert m.reqs_to_recv == {}
    assert [r.remote_request_id for r in m.reqs_to_release] == ["p-1"]
    assert sched.request_finished(req, [1, 2, 3]) == (False, None)
    assert not sched.has_request_state("d-3")


def test_too_few_allocated_blocks_ship_a_failed_load() -> None:
    sched = scheduler()
    req = request("d-4", 12, remote_params(12))
    sched.get_num_new_matched_tokens(req, 0)
    sched.update_state_after_alloc(req, ([1, 2],), 11)
    reason = meta(sched).reqs_to_recv["d-4"].fail_reason
    assert reason is not None and "only 2 blocks allocated" in reason


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (remote_params(12, remote_port="x"), "kv_transfer_params.remote_port"),
        (remote_params(12, remote_block_ids=[1, 2]), "2 blocks, but the prompt of 12 tokens"),
        (remote_params(12, tp_size=2), "kv_transfer_params.tp_size"),
        ({**remote_params(12), "extra": 1}, "kv_transfer_params.extra: unknown field"),
        (remote_params(12, remote_block_ids=[4, 5, 4]), "block 4 appears twice"),
    ],
)
def test_invalid_params_fall_back_to_local_prefill_with_a_clear_log(
    params: dict[str, Any], message: str, caplog: pytest.LogCaptureFixture
) -> None:
    sched = scheduler()
    req = request("bad", 12, params)
    with caplog.at_level(logging.WARNING):
        assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
        assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    assert [r.getMessage() for r in caplog.records if message in r.getMessage()] != []
    assert len(caplog.records) == 1  # logged once, not every step
    sched.update_state_after_alloc(req, ([1, 2, 3],), 0)
    assert meta(sched).reqs_to_recv == {}
    assert sched.request_finished(req, [1, 2, 3]) == (False, None)
    assert not sched.has_request_state("bad")


def test_reused_remote_block_ids_are_refused_but_a_sliding_windows_null_blocks_repeat() -> None:
    """One remote block cannot hold two parts of a prompt: such params fall back to local
    prefill (the ``block 4 appears twice`` case above). A sliding-window group's table repeats
    vLLM's null block (0) where blocks left the window: accepted there, and only there.
    Checked against a broken build (no ``check_distinct_blocks``): the refusal case fails."""
    base = spec(2)
    full, window = base.groups
    sliding = replace(window, attention="sliding_window", sliding_window=8)
    hybrid_spec = replace(base, groups=(full, sliding))
    hybrid = NixlScheduler(config("kv_both", "eng", side_channel_port=5600), hybrid_spec)
    nulls = remote_params(12, remote_block_ids=[[4, 5, 6], [0, 0, 9]])
    assert hybrid.get_num_new_matched_tokens(request("sw", 12, nulls), 0) == (11, True)
    full_nulls = remote_params(12, remote_block_ids=[[0, 0, 6], [7, 8, 9]])
    assert hybrid.get_num_new_matched_tokens(request("full", 12, full_nulls), 0) == (0, False)


def test_producer_only_engine_ignores_remote_prefill() -> None:
    sched = scheduler(role="kv_producer")
    assert sched.get_num_new_matched_tokens(request("x", 8, remote_params(8)), 0) == (0, False)


def test_request_ending_mid_load_is_cancelled_and_awaits_finished_recving() -> None:
    sched = scheduler()
    req = request("d-5", 8, remote_params(8))
    sched.get_num_new_matched_tokens(req, 0)
    sched.update_state_after_alloc(req, ([4, 5],), 7)
    meta(sched)
    # No delay_free: the engine itself holds a loading request's blocks until finished_recving.
    assert sched.request_finished(req, [4, 5]) == (False, None)
    assert meta(sched, 1).reqs_aborted == {"d-5": True}
    assert sched.has_request_state("d-5")
    sched.update_connector_output(ConnectorOutput(finished_recving=frozenset({"d-5"})))
    assert not sched.has_request_state("d-5")


def test_request_ending_before_its_plan_shipped_frees_at_once_and_releases() -> None:
    sched = scheduler()
    req = request("d-6", 8, remote_params(8))
    sched.get_num_new_matched_tokens(req, 0)
    sched.update_state_after_alloc(req, ([4, 5],), 7)
    assert sched.request_finished(req, [4, 5]) == (False, None)
    m = meta(sched)
    assert m.reqs_to_recv == {} and [r.remote_request_id for r in m.reqs_to_release] == ["p-1"]
    assert not sched.has_request_state("d-6")


def test_preempted_load_is_cancelled_without_a_sending_report() -> None:
    sched = scheduler()
    req = request("d-7", 8, remote_params(8))
    sched.get_num_new_matched_tokens(req, 0)
    sched.update_state_after_alloc(req, ([4, 5],), 7)
    meta(sched)
    assert meta(sched, 1, preempted_req_ids=frozenset({"d-7"})).reqs_aborted == {"d-7": False}


# -- producer ----------------------------------------------------------------------------------
def test_remote_decode_request_holds_its_prompt_blocks_and_returns_params() -> None:
    sched = scheduler()
    req = request("p-1", 10, {"do_remote_decode": True}, computed=10)
    delay, params = sched.request_finished(req, [9, 3, 5, 6])  # one extra block beyond the prompt
    assert delay is True and params is not None
    assert params == {
        "do_remote_decode": False,
        "do_remote_prefill": True,
        "remote_engine_id": "eng",
        "remote_host": "127.0.0.1",
        "remote_port": 5600,
        "remote_block_ids": [9, 3, 5],
        "remote_request_id": "p-1",
        "tp_size": 1,
    }
    send = meta(sched).reqs_to_send["p-1"]
    assert (send.num_blocks, send.lease_duration_s, send.abort_timeout_s) == (3, 30.0, 480.0)
    assert sched.num_held_for_remote_decode == 1
    sched.update_connector_output(ConnectorOutput(finished_sending=frozenset({"p-1"})))
    assert sched.num_held_for_remote_decode == 0 and not sched.has_request_state("p-1")


@pytest.mark.parametrize("reason", ["abort", "error", "stop", "rejected"])
def test_remote_decode_request_not_ended_by_length_frees_at_once(reason: str) -> None:
    """vLLM's rule: only a request that finished by length hands its params to a consumer;
    an aborted or failed one reaches none, so its blocks are freed now, not at the lease's end."""
    sched = scheduler()
    req = replace(request("p-1", 10, {"do_remote_decode": True}, computed=10), finish_reason=reason)
    assert sched.request_finished_all_groups(req, ([9, 3, 5],)) == (False, None)
    assert meta(sched).reqs_to_send == {}
    assert sched.get_kv_connector_gauges() == {"num_blocks_held_for_remote_decode": 0}
    assert not sched.has_request_state("p-1")


@pytest.mark.parametrize("reason", ["length", None])  # None: the engine does not say
def test_held_blocks_gauge_counts_blocks_until_finished_sending(reason: str | None) -> None:
    sched = scheduler(groups=2)
    req = replace(request("p-1", 10, {"do_remote_decode": True}, computed=10), finish_reason=reason)
    assert sched.request_finished_all_groups(req, ([9, 3, 5], [1, 2, 4])).delay_free
    gauge = "num_blocks_held_for_remote_decode"
    assert sched.get_kv_connector_gauges() == {gauge: 6}  # planned, not shipped yet
    meta(sched)
    assert sched.get_kv_connector_gauges() == {gauge: 6}  # shipped, held
    sched.update_connector_output(ConnectorOutput(finished_sending=frozenset({"p-1"})))
    assert sched.get_kv_connector_gauges() == {gauge: 0}


@pytest.mark.parametrize(
    ("req", "blocks"),
    [
        (request("plain", 8), [1, 2]),
        (request("aborted-early", 8, {"do_remote_decode": True}, computed=4), [1, 2]),
        (request("bad-params", 8, {"do_remote_decode": "yes"}, computed=8), [1, 2]),
    ],
)
def test_requests_that_cannot_be_held_free_at_once_and_leave_no_state(
    req: Any, blocks: list[int]
) -> None:
    sched = scheduler()
    assert sched.request_finished(req, blocks) == (False, None)
    assert sched.request_finished_all_groups(req, (blocks,)) == (False, None)
    assert meta(sched).reqs_to_send == {}
    assert not sched.has_request_state(req.request_id)


def test_consumer_only_engine_does_not_hold() -> None:
    sched = scheduler(role="kv_consumer")
    assert sched.request_finished(request("p", 4, {"do_remote_decode": True}, computed=4), [1]) == (
        False,
        None,
    )


# -- hybrid caches -----------------------------------------------------------------------------
def test_hma_producer_holds_and_advertises_every_groups_blocks() -> None:
    assert NixlConnector.supports_hma()
    sched = scheduler(groups=2)
    req = request("p-h", 6, {"do_remote_decode": True}, computed=6)
    delay, params = sched.request_finished_all_groups(req, ([1, 2], [7, 8, 9]))
    assert delay and params is not None and params["remote_block_ids"] == [[1, 2], [7, 8]]
    assert meta(sched).reqs_to_send["p-h"].num_blocks == 4
    plain = request("plain", 6)
    assert sched.request_finished_all_groups(plain, ([1, 2], [3, 4])) == (False, None)
    assert not sched.has_request_state("plain")


def test_hma_consumer_plans_every_group() -> None:
    sched = scheduler(groups=2)
    req = request("d-h", 6, remote_params(6, remote_block_ids=[[10, 11], [20, 21]]))
    assert sched.get_num_new_matched_tokens(req, 0) == (5, True)
    sched.update_state_after_alloc(req, ([1, 2], [3, 4]), 5)
    spec_ = meta(sched).reqs_to_recv["d-h"]
    assert spec_.local_block_ids == ([1, 2], [3, 4])
    assert spec_.remote_block_ids == ([10, 11], [20, 21])
    single = request("d-s", 6, remote_params(6))  # one group's ids for a two-group engine
    assert sched.get_num_new_matched_tokens(single, 0) == (0, False)


def test_scheduler_half_imports_without_torch() -> None:
    code = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked")
        sys.meta_path.insert(0, Block())
        from kvbridge.config import TransferConfig
        from kvbridge.connector.base import KVConnectorRole
        from kvbridge.connector.factory import create_connector
        from kvbridge.connector.types import KVCacheSpec
        import kvbridge.nixl.scheduler, kvbridge.nixl.params, kvbridge.nixl.metadata
        import kvbridge.nixl.connector
        cfg = TransferConfig(
            kv_connector="NixlConnector", kv_connector_extra_config={"nixl_wrapper": "fake"}
        )
        spec = KVCacheSpec(
            block_size=4, num_blocks=8, num_layers=2, num_kv_heads=1, head_dim=4, dtype="bfloat16"
        )
        create_connector(cfg, KVConnectorRole.SCHEDULER, spec)
        assert "torch" not in sys.modules
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
