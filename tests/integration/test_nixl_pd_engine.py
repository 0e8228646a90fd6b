"""Prefill/decode disaggregation over real NIXL (UCX): two reference engines, two OS processes.

The producer (P) runs in a spawned process and serves prefill commands over a Pipe; the
consumer (D) and a monolithic engine run here. For every prompt D's greedy tokens must equal
the monolithic run's, the bytes D read must be counted, and both block pools must drain.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import random
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

import pytest

from kvbridge.config import TransferConfig
from kvbridge.connector.stats import KVConnectorStats
from kvbridge.engine.engine import EngineConfig, LLMEngine
from kvbridge.engine.request import RequestOutput
from kvbridge.engine.sampling import SamplingParams
from kvbridge.nixl import stats as keys
from support.nixl_marks import needs_nixl

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(120),
    needs_nixl,
]

BS = 4
P_BLOCKS = 32  # small, so fragmenting it takes one step of 32 one-block fillers
D_BLOCKS = 64
MAX_TOKENS = 8
DEADLINE_S = 30.0
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
PREFILL = SamplingParams(max_tokens=1, ignore_eos=True)


def _engine(blocks: int, transfer: TransferConfig | None = None) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model="tiny",
            block_size=BS,
            num_gpu_blocks=blocks,
            max_num_seqs=P_BLOCKS,
            max_model_len=128,
            kv_transfer_config=transfer,
        )
    )


def _nixl(role: str, engine_id: str) -> TransferConfig:
    return TransferConfig(
        kv_connector="NixlConnector",
        kv_role=role,  # type: ignore[arg-type]
        engine_id=engine_id,
        kv_connector_extra_config={"side_channel_port": 0, "transfer_timeout_s": DEADLINE_S},
    )


# -- the producer process ----------------------------------------------------------------------
def _pool_state(engine: LLMEngine) -> dict[str, int]:
    engine.check_integrity()
    bm = engine.block_manager
    return {
        "free": bm.num_free_blocks,
        "total": bm.num_blocks,
        "held": engine.scheduler.num_held_requests,
        "unfinished": int(engine.has_unfinished_requests()),
    }


def _fragment(engine: LLMEngine, conn: Connection) -> None:
    """Fill every block with one-block requests, then abort odd ones before even ones.

    The cached-free LRU then reads 1, 3, 5, ..., 0, 2, ...: the next prompt's blocks are
    not contiguous.
    """
    ids = [
        engine.add_request([(7 * i + j) % 250 for j in range(BS)], GREEDY, request_id=f"fill-{i}")
        for i in range(P_BLOCKS)
    ]
    engine.step()
    if engine.block_manager.num_free_blocks != 0:
        raise RuntimeError("fillers did not take every block")
    for rid in ids[1::2] + ids[0::2]:
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
    conn.send(("fragmented", _pool_state(engine)))


def _producer_main(conn: Connection) -> None:
    engine = _engine(P_BLOCKS, _nixl("kv_producer", "prefill"))
    try:
        conn.send(("ready", _pool_state(engine)))
        running = True
        while running:
            # Idle waits are on the pipe, so a command ends them at once; held blocks need
            # steps too (they drain the consumer's NIXL notifications).
            wait = 0.05
            if engine.has_unfinished_requests():
                wait = 0.0
            elif engine.has_pending_transfers():
                wait = 0.002
            while running and conn.poll(wait):
                wait = 0.0
                cmd, *args = conn.recv()
                if cmd == "prefill":
                    rid, prompt = args
                    engine.add_request(prompt, PREFILL, rid, {"do_remote_decode": True})
                elif cmd == "fragment":
                    _fragment(engine, conn)
                elif cmd == "state":
                    conn.send(("state", _pool_state(engine)))
                elif cmd == "stop":
                    running = False
            if running and (engine.has_unfinished_requests() or engine.has_pending_transfers()):
                for out in engine.step():
                    if out.finished:
                        conn.send(("prefilled", out))
                engine.check_integrity()
    finally:
        engine.shutdown()
        conn.send(("stopped", None))


class Producer:
    """The test's handle on the producer process: send a command, wait for its reply."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, theirs = ctx.Pipe()
        self.proc = ctx.Process(target=_producer_main, args=(theirs,), daemon=True)
        self.proc.start()
        theirs.close()
        self.initial = self.expect("ready")

    def expect(self, kind: str, timeout: float = DEADLINE_S) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.conn.poll(left):
                raise AssertionError(f"producer sent no {kind!r} within {timeout}s")
            got, payload = self.conn.recv()
            if got == kind:
                return payload
            raise AssertionError(f"producer sent {got!r}, expected {kind!r}")

    def prefill(self, rid: str, prompt: list[int]) -> RequestOutput:
        self.conn.send(("prefill", rid, prompt))
        out: RequestOutput = self.expect("prefilled")
        assert out.request_id == rid and out.finish_reason == "length", out
        return out

    def state(self) -> dict[str, int]:
        self.conn.send(("state",))
        state: dict[str, int] = self.expect("state")
        return state

    def close(self) -> int | None:
        try:
            if self.proc.is_alive():
                self.conn.send(("stop",))
                self.expect("stopped")
        finally:
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)
        return self.proc.exitcode


@pytest.fixture
def producer() -> Iterator[Producer]:
    p = Producer()
    try:
        yield p
    finally:
        assert p.close() == 0


# -- the test ----------------------------------------------------------------------------------
def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(n)]


def _contiguous(ids: list[int]) -> bool:
    return all(b == a + 1 for a, b in itertools.pairwise(ids))


def _wait_drained(p: Producer) -> dict[str, int]:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        state = p.state()
        if state["free"] == state["total"] and state["held"] == 0:
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"producer pool never drained: {state}")


def test_decode_engine_matches_monolithic_run_and_both_pools_drain(producer: Producer) -> None:
    assert producer.initial["free"] == P_BLOCKS
    prompts = {
        "fragmented": _prompt(3 * BS + 2, seed=1),  # 4 blocks, the last one partial
        "exact": _prompt(4 * BS, seed=2),  # a multiple of block_size
        "one-plus-one": _prompt(BS + 1, seed=3),  # one full block and one token
        "long": _prompt(7 * BS + 3, seed=4),
    }
    mono = _engine(D_BLOCKS)
    decode = _engine(D_BLOCKS, _nixl("kv_consumer", "decode"))
    try:
        expected = dict(
            zip(prompts, (o.token_ids for o in mono.generate(list(prompts.values()), GREEDY)))
        )

        producer.conn.send(("fragment",))
        assert producer.expect("fragmented")["free"] == P_BLOCKS
        params: dict[str, dict[str, Any]] = {}
        for name, prompt in prompts.items():
            out = producer.prefill(f"p-{name}", prompt)
            assert out.token_ids == expected[name][:1]  # P's one token is the first of D's
            assert out.kv_transfer_params is not None
            params[name] = out.kv_transfer_params
        remote_ids = {name: p["remote_block_ids"] for name, p in params.items()}
        assert not _contiguous(remote_ids["fragmented"]), remote_ids
        for name, prompt in prompts.items():
            assert len(remote_ids[name]) == -(-len(prompt) // BS)
        assert producer.state()["held"] == len(prompts)  # P keeps every prompt's blocks

        for name, prompt in prompts.items():
            decode.add_request(prompt, GREEDY, f"d-{name}", params[name])
        finals = {o.request_id: o for o in decode.drain(timeout_s=DEADLINE_S) if o.finished}
        decode.check_integrity()
        for name, prompt in prompts.items():
            out = finals[f"d-{name}"]
            assert out.error is None, out.error
            assert out.num_external_tokens == len(prompt)  # P handed its first token over
            assert out.token_ids == expected[name], name

        stats = decode.kv_connector_stats
        assert isinstance(stats, KVConnectorStats)
        spec = decode.runner.cache_spec
        blocks_read = sum(len(ids) for ids in remote_ids.values())
        assert stats.data[keys.NUM_TRANSFERS] == len(prompts)
        assert sum(stats.data[keys.BYTES]) == blocks_read * spec.block_bytes  # type: ignore[arg-type]
        assert keys.FAILED_TRANSFERS not in stats.data

        assert decode.block_manager.num_free_blocks == D_BLOCKS
        assert not decode.has_pending_transfers()
        final = _wait_drained(producer)
        assert final == {"free": P_BLOCKS, "total": P_BLOCKS, "held": 0, "unfinished": 0}
    finally:
        mono.shutdown()
        decode.shutdown()
