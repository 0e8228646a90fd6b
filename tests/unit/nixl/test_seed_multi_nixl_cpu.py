"""Seed scenarios on MultiConnector(NixlConnector, SimpleCPUOffloadConnector), FakeNixlWrapper.

(a)-(f) are the issue's seed scenarios; the last tests are SPEC §2's "no store of unloaded
blocks" regression, by hand and through the reference engine.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from nixl_helpers import BLOCK_SIZE, Node, make_node, notifier_of, spec
from seed_helpers import (
    CPU_CHILD,
    NOOP_CHILD,
    Composite,
    FakeFactory,
    hashed_request,
    hold,
    multi_config,
    nixl_child,
    remote_params,
    run_engine,
    tiny_engine,
)

from kvbridge.connector.base import KVConnectorRole
from kvbridge.connector.factory import create_connector
from kvbridge.connector.multi import MultiConnector, MultiWorkerMetadata
from kvbridge.connector.noop import NoOpConnector
from kvbridge.connector.stats import MultiKVConnectorStats
from kvbridge.connector.types import ScheduledRequest, SchedulerStep
from kvbridge.engine.engine import LLMEngine
from kvbridge.engine.request import RequestOutput, RequestStatus
from kvbridge.engine.sampling import SamplingParams
from kvbridge.nixl import stats as keys
from kvbridge.nixl.connector import NixlConnector
from kvbridge.nixl.metadata import NixlWorkerMetadata, decode_notif, encode_notif
from kvbridge.offload.connector import SimpleCPUOffloadConnector
from kvbridge.offload.metadata import CPUOffloadMetadata, CPUOffloadWorkerMetadata

BS = BLOCK_SIZE
PROMPT = list(range(100, 113))  # 13 tokens: 3 full blocks and one token
N = len(PROMPT)
GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)


@pytest.fixture
def producer() -> Iterator[Node]:
    """A producer NixlWorker on a fake transport holding "p-1"; its side channel is real."""
    node = make_node("kv_producer", "prefill")
    hold(node, "p-1", 4)
    yield node
    node.worker.shutdown()


def store_on_cpu(c: Composite, rid: str, tokens: list[int], blocks: list[int]) -> None:
    """Run a plain request through prefill and one decode step: its full blocks reach CPU."""
    req = hashed_request(rid, tokens)
    assert c.sched.get_num_new_matched_tokens(req, 0) == (0, False)
    c.sched.update_state_after_alloc(req, (blocks,), 0)
    c.step(ScheduledRequest(req, (blocks,), 0, len(tokens)))
    req.num_computed_tokens = len(tokens)
    c.step(ScheduledRequest(req, (blocks,), len(tokens), 1))
    assert c.cpu.pool.lookup(req.block_hashes) == len(tokens) // BS
    assert c.sched.request_finished(req, blocks) == (False, None)


# -- (a) ----------------------------------------------------------------------------------------
def test_a_remote_prefill_is_won_by_nixl_and_the_cpu_child_loads_nothing(producer: Node) -> None:
    c = Composite("kv_consumer")
    try:
        store_on_cpu(c, "warm", PROMPT, [0, 1, 2, 3])  # the CPU child could serve 3 blocks too
        port = producer.worker.side_channel_port
        assert port is not None
        req = hashed_request("remote", PROMPT, remote_params(port, [5, 9, 3, 12]))
        assert c.sched.get_num_new_matched_tokens(req, 0) == (N - 1, True)
        c.sched.update_state_after_alloc(req, ([4, 5, 6, 7],), N - 1)
        assert c.cpu.pool.num_pins == 0  # the CPU child dropped its tentative pins
        c.step()
        recv = c.nixl_meta().reqs_to_recv["remote"]
        assert recv.local_block_ids == ([4, 5, 6, 7],)
        assert recv.remote_block_ids == ([5, 9, 3, 12],)
        assert c.cpu_meta().is_empty()
        outs = c.run_until(lambda o: "remote" in o.finished_recving)
        assert all(not o.invalid_block_ids for o in outs)
        sent = [
            (a, (decode_notif(m).kind, decode_notif(m).request_ids))
            for a, m in notifier_of(c.nixl_worker).sent_notifs
        ]
        assert (producer.fake.REMOTE_AGENT_NAME, ("done", ["p-1"])) in sent
        assert all(not c.cpu_meta(k).loads for k in range(len(c.metas)))
        assert c.sched.request_finished(req, [4, 5, 6, 7]) == (False, None)
        assert not c.has_state("remote")
    finally:
        c.shutdown()


# -- (b) ----------------------------------------------------------------------------------------
def test_b_without_remote_params_a_cpu_hit_is_won_by_the_cpu_child() -> None:
    c = Composite("kv_consumer")
    try:
        store_on_cpu(c, "warm", PROMPT, [0, 1, 2, 3])
        want = [t[[0, 1, 2]].clone() for t in c.cache.values()]
        for t in c.cache.values():
            t.normal_()
        req = hashed_request("hit", PROMPT)
        assert c.sched.get_num_new_matched_tokens(req, 0) == (3 * BS, True)
        c.sched.update_state_after_alloc(req, ([8, 9, 10, 11],), 3 * BS)
        outs = c.run_until(lambda o: "hit" in o.finished_recving)
        assert not c.nixl_meta(-len(outs)).reqs_to_recv
        assert [j.gpu_block_ids for j in c.cpu_meta(-len(outs)).loads] == [[8, 9, 10]]
        assert all(not o.invalid_block_ids for o in outs)
        for got, expected in zip(c.cache.values(), want):
            assert torch.equal(got[[8, 9, 10]], expected)
        assert c.cpu.pool.num_pins == 0
        assert c.sched.request_finished(req, [8, 9, 10, 11]) == (False, None)
        assert not c.has_state("hit")
    finally:
        c.shutdown()


# -- (c) ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_groups", [1, 2])
def test_c_a_plain_request_finishes_with_nothing_and_leaves_no_state(num_groups: int) -> None:
    s = spec(num_groups)
    c = Composite("kv_both", s=s)  # the CPU child supports HMA: it runs on every group too
    try:
        finishes = {"plain-all-groups": c.sched.request_finished_all_groups}
        if num_groups == 1:
            finishes["plain"] = lambda r, b: c.sched.request_finished(r, b[0])
        for k, (rid, finish) in enumerate(finishes.items()):
            tokens = [200 + 20 * k + i for i in range(2 * BS + 1)]
            req = hashed_request(rid, tokens)
            blocks = tuple([3 * g + 4 * k + i for i in range(3)] for g in range(num_groups))
            assert c.sched.get_num_new_matched_tokens(req, 0) == (0, False)
            c.sched.update_state_after_alloc(req, blocks, 0)
            c.step(ScheduledRequest(req, blocks, 0, len(tokens)))
            req.num_computed_tokens = len(tokens)
            c.step(ScheduledRequest(req, blocks, len(tokens), 1))
            assert finish(req, blocks) == (False, None)
            assert not c.has_state(rid)
            out = c.step(finished=frozenset({rid}))
            assert not out.finished_sending and not out.finished_recving
    finally:
        c.shutdown()


# -- (d) ----------------------------------------------------------------------------------------
def test_d_hma_needs_every_child_and_every_child_sees_every_group() -> None:
    with_cpu = multi_config("kv_both", "e", nixl_child(), CPU_CHILD)
    all_hma = multi_config("kv_producer", "prefill", nixl_child(), NOOP_CHILD)
    assert NixlConnector.supports_hma() and NoOpConnector.supports_hma()
    assert SimpleCPUOffloadConnector.supports_hma()
    assert MultiConnector.supports_hma(with_cpu) and MultiConnector.supports_hma(all_hma)
    for role in KVConnectorRole:  # one group or two: the CPU child has HMA
        for num_groups in (1, 2):
            create_connector(with_cpu, role, spec(num_groups)).shutdown()
    c = Composite("kv_producer", "prefill", second=NOOP_CHILD, s=spec(2))
    try:
        c.step()  # the worker announces its side-channel port
        req = hashed_request("pd", PROMPT, {"do_remote_decode": True})
        req.num_computed_tokens = N
        blocks = ([1, 2, 3, 4], [9, 8, 7, 6])
        delay, params = c.sched.request_finished_all_groups(req, blocks)
        assert delay and params is not None
        assert params["remote_block_ids"] == [[1, 2, 3, 4], [9, 8, 7, 6]]
        assert params["remote_port"] == c.nixl_worker.side_channel_port
    finally:
        c.shutdown()


# -- (e) ----------------------------------------------------------------------------------------
def test_e_both_childrens_metadata_travel_in_child_order_every_step(producer: Node) -> None:
    factory = FakeFactory(cycles=2)
    c = Composite("kv_consumer", nixl=nixl_child(factory))
    try:
        local = hashed_request("local", list(range(50, 59)))
        c.sched.get_num_new_matched_tokens(local, 0)
        c.sched.update_state_after_alloc(local, ([0, 1, 2],), 0)
        c.step(ScheduledRequest(local, ([0, 1, 2],), 0, 9))
        port = producer.worker.side_channel_port
        assert port is not None
        remote = hashed_request("remote", PROMPT, remote_params(port, [0, 1, 2, 3]))
        assert c.sched.get_num_new_matched_tokens(remote, 0) == (N - 1, True)
        c.sched.update_state_after_alloc(remote, ([4, 5, 6, 7],), N - 1)
        local.num_computed_tokens = 9
        c.step(ScheduledRequest(local, ([0, 1, 2],), 9, 1))  # a store and a load, one step
        c.run_until(lambda o: "remote" in o.finished_recving)
        for k in range(len(c.metas)):  # each part is its child's type, every step
            c.nixl_meta(k), c.cpu_meta(k)
        assert "remote" in c.nixl_meta(1).reqs_to_recv
        assert [j.gpu_block_ids for j in c.cpu_meta(1).stores] == [[0, 1]]
        metas = [o.worker_meta for o in c.outputs if o.worker_meta is not None]
        parts = [m.metadata for m in metas if isinstance(m, MultiWorkerMetadata)]
        assert parts and len(parts) == len(metas) and all(len(p) == 2 for p in parts)
        assert all(p[0] is None or isinstance(p[0], NixlWorkerMetadata) for p in parts)
        assert any(isinstance(p[1], CPUOffloadWorkerMetadata) for p in parts)
    finally:
        c.shutdown()


# -- (f) ----------------------------------------------------------------------------------------
def test_f_store_goes_to_both_and_the_request_is_released_once_after_both() -> None:
    factory = FakeFactory()
    c = Composite("kv_producer", "prefill", nixl=nixl_child(factory))
    try:
        c.step()  # the worker announces its side-channel port
        blocks = [2, 3, 4, 5]
        req = hashed_request("pd", PROMPT, {"do_remote_decode": True})
        assert c.sched.get_num_new_matched_tokens(req, 0) == (0, False)
        c.sched.update_state_after_alloc(req, (blocks,), 0)
        c.step(ScheduledRequest(req, (blocks,), 0, N))
        req.num_computed_tokens = N
        req.output_token_ids.append(7)
        delay, params = c.sched.request_finished(req, blocks)  # Nixl holds, CPU flushes
        assert delay and params is not None and params["remote_block_ids"] == blocks
        out = c.step(finished=frozenset({"pd"}))
        assert c.nixl_worker.leases.is_live("pd")  # start_load_kv reached the Nixl child
        (store,) = c.cpu_meta().stores
        assert store.gpu_block_ids == [2, 3, 4]
        backend = c.cpu_worker().backend  # wait_for_save reached the CPU child
        assert backend is not None
        for gpu, cpu in zip(backend.gpu_layers, backend.cpu_layers):
            assert torch.equal(cpu[store.cpu_block_ids], gpu[[2, 3, 4]])
        assert c.cpu.pool.lookup(req.block_hashes) == 3
        assert not out.finished_sending  # the CPU child is done, the Nixl child still holds
        factory.fakes[0].deliver_notif("decode-agent", encode_notif("done", ["pd"]))
        sending = [c.step().finished_sending for _ in range(3)]
        assert sending == [{"pd"}, frozenset(), frozenset()]
        assert c.nixl_worker.leases.num_live == 0 and not c.has_state("pd")
    finally:
        c.shutdown()


# -- SPEC §2: the CPU child never stores blocks the Nixl child is still loading -----------------
def test_no_cpu_store_of_blocks_while_nixl_loads_them(producer: Node) -> None:
    factory = FakeFactory(cycles=3)
    c = Composite("kv_consumer", nixl=nixl_child(factory))
    try:
        port = producer.worker.side_channel_port
        assert port is not None
        req = hashed_request("remote", PROMPT, remote_params(port, [0, 1, 2, 3]))
        blocks = [4, 5, 6, 7]
        assert c.sched.get_num_new_matched_tokens(req, 0) == (N - 1, True)
        c.sched.update_state_after_alloc(req, (blocks,), N - 1)
        # An engine that counts matched tokens as computed while the load runs.
        sched = ScheduledRequest(req, (blocks,), N - 1, 1)
        outs = c.run_until(lambda o: "remote" in o.finished_recving, sched)
        assert len(outs) > 1  # the load spanned steps
        assert all(not c.cpu_meta(k).stores for k in range(len(c.metas)))
        c.step(sched)
        assert [j.gpu_block_ids for j in c.cpu_meta().stores] == [[4, 5, 6]]
    finally:
        c.shutdown()


@pytest.mark.parametrize("outcome", ["done", "err"])
def test_engine_stores_loaded_blocks_only_after_the_load_and_errors_only_recomputed(
    outcome: str,
) -> None:
    factory = FakeFactory(cycles=2)
    cpu = {**CPU_CHILD, "kv_connector_extra_config": {"num_cpu_blocks": 16}}
    eng = tiny_engine(multi_config("kv_consumer", "decode", nixl_child(factory), cpu))
    producer = make_node("kv_producer", "prefill", s=eng.runner.cache_spec)
    mono = tiny_engine()
    try:
        hold(producer, "p-1", 4)
        port = producer.worker.side_channel_port
        assert port is not None
        if outcome == "err":
            factory.fakes[0].fail_next_xfers(1)
        eng.add_request(PROMPT, GREEDY, "d", remote_params(port, [0, 1, 2, 3]))
        hashes = eng.scheduler.requests["d"].block_hashes[:3]
        out, steps = run_engine(eng, "d", hashes)
        loading = [
            s for s in steps if s.before and s.before[0] is RequestStatus.WAITING_FOR_REMOTE_KVS
        ]
        assert len(loading) >= 2  # the load spanned steps
        assert set().union(*(s.stored for s in steps)) == {0, 1, 2}
        for s in steps:  # a block is stored once confirmed: loaded and received, or recomputed
            for i in s.stored:
                assert (
                    s.before is not None and s.before[0] is not RequestStatus.WAITING_FOR_REMOTE_KVS
                )
                assert s.before[1] >= (i + 1) * BS, (i, s)
        # A failed READ loaded nothing: every token was recomputed, none counts as external.
        assert out.num_external_tokens == (N - 1 if outcome == "done" else 0)
        if outcome == "err":
            check_recomputed_then_served_from_cpu(eng, mono, out, hashes)
    finally:
        eng.shutdown()
        mono.shutdown()
        producer.worker.shutdown()


def check_recomputed_then_served_from_cpu(
    eng: LLMEngine, mono: LLMEngine, out: RequestOutput, hashes: list[bytes]
) -> None:
    """The failed blocks were recomputed before being stored: a CPU reload serves the KV of
    the monolithic run (garbage stored from the failed READ would change the tokens)."""
    (expected,) = mono.generate([PROMPT], GREEDY)
    assert out.token_ids == expected.token_ids
    stats = eng.kv_connector_stats
    assert isinstance(stats, MultiKVConnectorStats)
    assert stats.per_connector["NixlConnector"].data[keys.FAILED_TRANSFERS] == 1
    eng.block_manager.reset_prefix_cache()
    eng.add_request(PROMPT, GREEDY, "again")
    again, _ = run_engine(eng, "again", hashes)
    assert again.num_external_tokens == 3 * BS  # served by the CPU tier
    assert again.token_ids == expected.token_ids
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_blocks_of_a_synchronous_load_are_stored_once_confirmed() -> None:
    sync_loader = {
        "kv_connector": "Recording",
        "kv_connector_module_path": "support.recording",
        "kv_connector_extra_config": {"name": "sync", "match": 2 * BS, "load_async": False},
    }
    sched = create_connector(
        multi_config("kv_both", "e", sync_loader, CPU_CHILD), KVConnectorRole.SCHEDULER, spec()
    )
    req = hashed_request("sync", list(range(300, 310)))  # 2 full blocks and 2 tokens
    blocks = ([0, 1, 2],)
    assert sched.get_num_new_matched_tokens(req, 0) == (2 * BS, False)
    sched.update_state_after_alloc(req, blocks, 2 * BS)
    steps = [  # the load lands during step 0; its tokens are confirmed from step 1 on
        ScheduledRequest(req, blocks, 0, len(req.prompt_token_ids) - 2 * BS),
        ScheduledRequest(req, blocks, len(req.prompt_token_ids), 1),
    ]
    stores = []
    for i, s in enumerate(steps):
        meta = sched.build_connector_meta(SchedulerStep(i, (s,)))
        cpu_meta = meta.metadata[1]
        assert isinstance(cpu_meta, CPUOffloadMetadata)
        stores += [j.gpu_block_ids for j in cpu_meta.stores]
    sched.shutdown()
    assert stores == [[0, 1]]
