"""Scheduler alone (no model): token budget, chunked prefill, preemption, connector accounting."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvbridge.config import TransferConfig
from kvbridge.connector.base import ConnectorOutput, EmptyMetadata, KVConnectorScheduler
from kvbridge.connector.types import (
    BlockIds,
    IntegrityError,
    KVCacheSpec,
    MatchResult,
    RequestView,
    SchedulerStep,
)
from kvbridge.engine.block_manager import BlockManager
from kvbridge.engine.request import Request, RequestStatus
from kvbridge.engine.sampling import SamplingParams
from kvbridge.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput, WorkerOutput
from kvbridge.kit.hashing import BlockHasher

BS = 4


class Offer(KVConnectorScheduler):
    """Offers ``ext`` tokens (sync or async) to every request; records the steps it saw."""

    def __init__(self, ext: int = 0, load_async: bool = False) -> None:
        spec = KVCacheSpec(
            block_size=BS, num_blocks=8, num_layers=1, num_kv_heads=1, head_dim=2, dtype="float32"
        )
        super().__init__(TransferConfig(kv_connector="Offer"), spec)
        self.ext, self.load_async = ext, load_async
        self.steps: list[SchedulerStep] = []
        self.allocs: list[tuple[str, int, int]] = []  # (request id, blocks, external tokens)

    def get_num_new_matched_tokens(self, request: RequestView, num_computed: int) -> MatchResult:
        return MatchResult(self.ext, self.load_async)

    def update_state_after_alloc(self, request: RequestView, b: BlockIds, n: int) -> None:
        self.allocs.append((request.request_id, len(b[0]), n))

    def build_connector_meta(self, step: SchedulerStep) -> EmptyMetadata:
        self.steps.append(step)
        return EmptyMetadata()


def make(
    num_blocks: int = 32, connector: KVConnectorScheduler | None = None, **kw: object
) -> Scheduler:
    config = SchedulerConfig(**{"max_model_len": 64, **kw})  # type: ignore[arg-type]
    return Scheduler(config, BlockManager(num_blocks, BS), connector)


def add(s: Scheduler, rid: str, n: int, max_tokens: int = 4) -> Request:
    request = Request(
        rid,
        [(7 * i + ord(rid[0])) % 50 for i in range(n)],
        SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        hasher=BlockHasher(BS),
    )
    s.add_request(request)
    return request


def step(s: Scheduler, out: ConnectorOutput | None = None) -> SchedulerOutput:
    """One step with a fake model: the sampled token is the request's length mod 50."""
    sched = s.schedule()
    assert sched.num_scheduled_tokens <= s.config.max_num_batched_tokens
    assert len(sched.chunks) <= s.config.max_num_seqs
    sampled = {c.request_id: c.request.num_tokens % 50 for c in sched.chunks if c.sample}
    s.update_from_output(sched, WorkerOutput(sampled, out or ConnectorOutput()))
    s.check_integrity()
    return sched


def shape(sched: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    return [(c.request_id, c.start_pos, len(c.token_ids), c.sample) for c in sched.chunks]


def test_scheduler_half_modules_import_without_torch() -> None:
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any `import torch` now raises\n"
        "import kvbridge.engine.scheduler, kvbridge.engine.block_manager\n"
        "import kvbridge.engine.request, kvbridge.kit.hashing\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_chunked_prefill_splits_prompts_within_the_token_budget() -> None:
    s = make(max_num_batched_tokens=8)
    add(s, "a", 20)
    add(s, "b", 5)
    assert shape(step(s)) == [("a", 0, 8, False)]
    assert shape(step(s)) == [("a", 8, 8, False)]
    # Prefill end of `a` and the start of `b` in one step; then a decode next to a prefill.
    assert shape(step(s)) == [("a", 16, 4, True), ("b", 0, 4, False)]
    assert shape(step(s)) == [("a", 20, 1, True), ("b", 4, 1, True)]


def test_without_chunking_a_prompt_waits_for_a_whole_budget() -> None:
    s = make(max_num_batched_tokens=16, max_model_len=16, enable_chunked_prefill=False)
    add(s, "a", 10)
    add(s, "b", 10)
    assert shape(step(s)) == [("a", 0, 10, True)]
    assert shape(step(s)) == [("a", 10, 1, True), ("b", 0, 10, True)]


def test_max_num_seqs_caps_the_running_set() -> None:
    s = make(max_num_seqs=2)
    for rid in "abc":
        add(s, rid, 3)
    assert [c.request_id for c in step(s).chunks] == ["a", "b"]
    while s.has_unfinished_requests():
        step(s)
    assert s.block_manager.num_free_blocks == 32


def test_preemption_frees_the_newest_and_requeues_it_first() -> None:
    s = make(num_blocks=6)
    a, b, c = add(s, "a", 8), add(s, "b", 8), add(s, "c", 7)
    step(s)  # all three prefilled: 2 + 2 + 2 blocks, the pool is full
    assert s.block_manager.num_free_blocks == 0
    sched = step(s)  # `a` needs a third block: `c` (newest) is preempted
    assert sched.step.preempted_req_ids == {"c"}
    assert [x.request_id for x in sched.chunks] == ["a", "b"]
    assert c.status is RequestStatus.PREEMPTED and c.num_computed_tokens == 0
    assert s.waiting[0] is c and not s.block_manager.has_blocks("c")
    resumed = []
    while s.has_unfinished_requests():
        sched = step(s)
        resumed += [r.request_id for r in sched.step.scheduled if r.resumed_from_preemption]
    assert resumed == ["c"]
    assert [len(r.output_token_ids) for r in (a, b, c)] == [4, 4, 4]
    assert s.block_manager.num_free_blocks == 6


def test_scheduled_requests_count_only_confirmed_tokens() -> None:
    sync = Offer(ext=8)
    s = make(connector=sync)
    add(s, "r", 13)
    step(s)
    step(s)
    first, second = (st.scheduled[0] for st in sync.steps[:2])
    assert (first.num_computed_tokens, first.num_scheduled_tokens) == (0, 5)  # 8 loading now
    assert (second.num_computed_tokens, second.num_scheduled_tokens) == (13, 1)

    parked = Offer(ext=12, load_async=True)
    s = make(connector=parked)
    add(s, "r", 13)
    step(s)
    assert parked.steps[0].scheduled == ()
    # Blocks for all 13 tokens while loading 12: the last token's block exists during the load.
    assert parked.allocs == [("r", 4, 12)]
    step(s, ConnectorOutput(finished_recving=frozenset({"r"})))
    step(s)
    resumed = parked.steps[2].scheduled[0]
    assert (resumed.num_computed_tokens, resumed.num_scheduled_tokens) == (12, 1)
    assert parked.allocs[1] == ("r", 4, 0)  # asked again once the load is done, loads nothing


def test_connector_offering_the_last_token_is_an_error() -> None:
    s = make(connector=Offer(ext=13))
    add(s, "r", 13)
    with pytest.raises(RuntimeError, match="last token"):
        s.schedule()


def test_finished_ids_reach_the_next_step_once() -> None:
    conn = Offer()
    s = make(connector=conn)
    add(s, "r", 3, max_tokens=1)
    step(s)
    step(s)
    step(s)
    assert [sorted(st.finished_req_ids) for st in conn.steps] == [[], ["r"], []]


def test_request_is_a_request_view_and_leaks_are_detected() -> None:
    s = make()
    r = add(s, "r", 5, max_tokens=1)
    assert isinstance(r, RequestView)
    step(s)
    assert not s.requests and s.block_manager.num_free_blocks == 32
    s.block_manager.allocate(r, 5)  # blocks for a request the scheduler no longer tracks
    with pytest.raises(IntegrityError, match="not a live request"):
        s.check_integrity()
