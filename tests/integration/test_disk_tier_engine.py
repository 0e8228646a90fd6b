"""The disk tier end to end on the reference engine: a prefix evicted from the GPU and the CPU
tier comes back from disk with the tokens and log-probabilities of recompute, a restarted
engine serves it from the records the first one wrote, and damaged records are misses."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from kvbridge.config import TransferConfig
from kvbridge.engine.engine import EngineConfig, LLMEngine
from kvbridge.engine.request import RequestOutput
from kvbridge.engine.sampling import SamplingParams
from kvbridge.oracle import Trace, check, reference

BS = 4
PARAMS = SamplingParams(max_tokens=6, ignore_eos=True, logprobs=5)


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(n)]


def engine_config(transfer: TransferConfig | None, num_gpu_blocks: int = 12) -> EngineConfig:
    return EngineConfig(
        model="tiny",
        block_size=BS,
        num_gpu_blocks=num_gpu_blocks,
        max_model_len=min(80, num_gpu_blocks * BS),
        kv_transfer_config=transfer,
    )


def disk_config(path: Path, *, capacity: int = 1 << 30, **extra: object) -> TransferConfig:
    return TransferConfig(
        kv_connector="SimpleCPUOffloadConnector",
        kv_connector_extra_config={
            "num_cpu_blocks": 12,
            "kv_offload_backend": "disk",
            "disk_path": str(path),
            "disk_capacity_bytes": capacity,
            "n_read_threads": 2,
            "n_write_threads": 2,
            **extra,
        },
    )


def run_one(engine: LLMEngine, tokens: list[int]) -> RequestOutput:
    """Run one request to completion (the disk writes it started included), checking every
    invariant after every step."""
    req_id = engine.add_request(tokens, PARAMS)
    final = None
    for _ in range(2000):
        if not (engine.has_unfinished_requests() or engine.has_pending_transfers()):
            break
        for out in engine.step():
            if out.request_id == req_id and out.finished:
                final = out
        engine.check_integrity()
    assert final is not None and final.error is None
    settle(engine)
    return final


def settle(engine: LLMEngine) -> None:
    """Step until the disk tier has no I/O in flight (writes end on worker threads)."""
    half = engine.scheduler_connector
    assert half is not None
    for _ in range(5000):
        if not half.get_kv_connector_gauges().get("kv_offload_disk_inflight_blocks"):
            return
        engine.step()
    raise AssertionError("disk I/O still in flight")


def stats(engine: LLMEngine) -> dict[str, int]:
    s = engine.kv_connector_stats
    return {} if s is None else {k: v for k, v in s.data.items() if not isinstance(v, list)}


A = prompt(30, seed=1)  # 7 full blocks before the last token
FILLERS = [prompt(30, seed=10 + i) for i in range(3)]  # each evicts A from GPU and CPU


@pytest.fixture(scope="module")
def expected() -> dict[tuple[int, ...], Trace]:
    return reference([A], engine_config(None, num_gpu_blocks=64), max_tokens=6)


def test_evicted_from_gpu_and_cpu_comes_back_from_disk_and_after_restart(
    tmp_path: Path, expected: dict[tuple[int, ...], Trace]
) -> None:
    config = engine_config(disk_config(tmp_path))
    with LLMEngine(config) as engine:
        run_one(engine, A)
        for f in FILLERS:
            run_one(engine, f)
        again = run_one(engine, A)
        got = stats(engine)
    assert again.num_external_tokens == 28  # every full block but the last token's
    assert got.get("disk_hits", 0) >= 7
    assert check(expected[tuple(A)], Trace.from_output(again)).ok
    with LLMEngine(config) as restarted:  # a new server on the same directory
        first = run_one(restarted, A)
        got = stats(restarted)
    assert first.num_external_tokens == 28 and got.get("disk_hits", 0) == 7
    assert check(expected[tuple(A)], Trace.from_output(first)).ok


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_records_are_misses_never_wrong_tokens(
    tmp_path: Path, expected: dict[tuple[int, ...], Trace], damage: str
) -> None:
    config = engine_config(disk_config(tmp_path))
    with LLMEngine(config) as engine:
        run_one(engine, A)
    records = sorted(tmp_path.rglob("*.kvb"))
    assert len(records) == 7
    for i, path in enumerate(records):  # every record damaged, each in its payload
        data = bytearray(path.read_bytes())
        if damage == "flip":
            data[4096 + 37 * i] ^= 0x01
            path.write_bytes(bytes(data))
        else:
            path.write_bytes(bytes(data[: len(data) - 4096 + 8]))
    with LLMEngine(config) as restarted:
        out = run_one(restarted, A)
        got = stats(restarted)
    assert out.num_external_tokens == 0
    assert check(expected[tuple(A)], Trace.from_output(out)).ok
    if damage == "flip":  # found on read: a corrupt record, dropped
        assert got.get("disk_corrupt_records", 0) >= 1 and got.get("disk_hits", 0) == 0
    else:  # found by the start-up scan (wrong size)
        assert got.get("disk_corrupt_records", 0) == 7
