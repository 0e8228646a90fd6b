"""The disk tier end to end on the reference engine: a prefix evicted from the GPU and the CPU
tier comes back from disk with the tokens and log-probabilities of recompute, a restarted
engine serves it from the records the first one wrote, and damaged records are misses."""

from __future__ import annotations

import errno
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvbridge.config import TransferConfig
from kvbridge.engine.engine import EngineConfig, LLMEngine
from kvbridge.engine.request import RequestOutput
from kvbridge.engine.sampling import SamplingParams
from kvbridge.offload.disk.halves import TieredOffloadScheduler
from kvbridge.offload.disk.io import O_DIRECT, RecordIO
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
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
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
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not half.get_kv_connector_gauges().get("kv_offload_disk_inflight_blocks"):
            return
        engine.step()
        time.sleep(0.001)
    raise AssertionError("disk I/O still in flight after 60 s")


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


def test_slow_disk_never_blocks_an_engine_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, expected: dict[tuple[int, ...], Trace]
) -> None:
    """Writes and reads that take 0.3 s each run on the I/O threads: no engine step waits for
    them (the request is asked again until its blocks are back)."""
    real_write, real_read = RecordIO.write, RecordIO.read

    def slow(real: Callable[..., int]) -> Callable[..., int]:
        def run(*args: Any) -> int:
            time.sleep(0.3)
            return real(*args)

        return run

    monkeypatch.setattr(RecordIO, "write", slow(real_write))
    monkeypatch.setattr(RecordIO, "read", slow(real_read))
    config = engine_config(disk_config(tmp_path))
    steps: list[float] = []
    with LLMEngine(config) as engine:
        real_step = engine.step

        def timed_step() -> list[RequestOutput]:
            start = time.perf_counter()
            try:
                return real_step()
            finally:
                steps.append(time.perf_counter() - start)

        monkeypatch.setattr(engine, "step", timed_step)
        run_one(engine, A)
        for f in FILLERS:
            run_one(engine, f)
        again = run_one(engine, A)
    assert again.num_external_tokens == 28
    assert check(expected[tuple(A)], Trace.from_output(again)).ok
    assert max(steps) < 0.25, f"a step took {max(steps):.3f} s with 0.3 s disk I/O"


def test_two_servers_share_a_directory(
    tmp_path: Path, expected: dict[tuple[int, ...], Trace]
) -> None:
    """Two engines on one directory store the same blocks at the same time (atomic renames);
    a third started later serves the prompt from their records."""
    config = engine_config(disk_config(tmp_path))
    with LLMEngine(config) as one, LLMEngine(config) as two:
        for engine in (one, two):
            engine.add_request(A, PARAMS)
        while any(e.has_unfinished_requests() or e.has_pending_transfers() for e in (one, two)):
            for engine in (one, two):
                engine.step()
        for engine in (one, two):
            settle(engine)
    assert len(list(tmp_path.rglob("*.kvb"))) == 7
    assert not list(tmp_path.rglob("*.tmp"))
    with LLMEngine(config) as third:
        out = run_one(third, A)
        got = stats(third)
    assert out.num_external_tokens == 28 and got.get("disk_hits") == 7
    assert not got.get("disk_corrupt_records")
    assert check(expected[tuple(A)], Trace.from_output(out)).ok


def test_a_filesystem_refusing_o_direct_runs_the_tier_buffered(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    expected: dict[tuple[int, ...], Trace],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """tmpfs before Linux 6.6 and some overlay filesystems answer O_DIRECT with EINVAL (here
    simulated, as this kernel's tmpfs accepts it): one warning, then buffered I/O."""
    real_open = os.open

    def no_direct(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if flags & O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", no_direct)
    config = engine_config(disk_config(tmp_path))
    logger = "kvbridge.offload.disk.worker"
    with caplog.at_level(logging.WARNING, logger=logger), LLMEngine(config) as engine:
        run_one(engine, A)
    assert "O_DIRECT is refused" in caplog.text and "falling back to buffered I/O" in caplog.text
    with LLMEngine(config) as restarted:
        out = run_one(restarted, A)
    assert out.num_external_tokens == 28
    assert check(expected[tuple(A)], Trace.from_output(out)).ok


def test_capacity_bound_evicts_least_recently_used_records(
    tmp_path: Path, expected: dict[tuple[int, ...], Trace]
) -> None:
    """A budget of 24 records: the oldest are deleted as newer blocks arrive, the directory
    never holds more, and a prompt still on disk is served from it."""
    with LLMEngine(engine_config(disk_config(tmp_path / "probe"))) as probe:
        half = probe.scheduler_connector
        assert isinstance(half, TieredOffloadScheduler)
        record = half.disk.sizes[0]
    root = tmp_path / "bounded"
    config = engine_config(disk_config(root, capacity=24 * record))
    with LLMEngine(config) as engine:
        for p in [A, *FILLERS, prompt(30, seed=98), prompt(30, seed=99)]:
            run_one(engine, p)  # the last two push F2 out of the GPU and CPU tiers
            assert len(list(root.rglob("*.kvb"))) <= 24
        last = run_one(engine, FILLERS[-1])
        got = stats(engine)
        again = run_one(engine, A)  # evicted from every tier: recomputed
    assert len(list(root.rglob("*.kvb"))) == 24
    assert got.get("disk_evictions") == 6 * 7 - 24  # oldest first: A's, F0's, 4 of F1's
    assert last.num_cached_tokens + last.num_external_tokens == 28  # GPU, CPU and disk hits
    assert last.num_external_tokens > 0 and got.get("disk_hits", 0) >= 1
    want = reference([FILLERS[-1]], engine_config(None, num_gpu_blocks=64), max_tokens=6)
    assert check(want[tuple(FILLERS[-1])], Trace.from_output(last)).ok
    assert again.num_external_tokens == 0
    assert check(expected[tuple(A)], Trace.from_output(again)).ok


def test_records_deleted_by_another_server_are_misses(
    tmp_path: Path, expected: dict[tuple[int, ...], Trace]
) -> None:
    """Indexed at start, deleted before the read (another server's eviction): a miss each,
    counted, and the prompt recomputed."""
    config = engine_config(disk_config(tmp_path))
    with LLMEngine(config) as engine:
        run_one(engine, A)
    with LLMEngine(config) as restarted:
        for path in tmp_path.rglob("*.kvb"):
            path.unlink()
        out = run_one(restarted, A)
        got = stats(restarted)
    assert out.num_external_tokens == 0 and got.get("disk_missing_records") == 7
    assert check(expected[tuple(A)], Trace.from_output(out)).ok


def test_records_whose_reads_fail_are_misses_and_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, expected: dict[tuple[int, ...], Trace]
) -> None:
    """Reads failing with EIO (the file is there): misses, counted, and the records deleted,
    never left on disk unindexed (outside the capacity bound). Writes fail too, so nothing
    rewrites them."""
    config = engine_config(disk_config(tmp_path))
    with LLMEngine(config) as engine:
        run_one(engine, A)
    assert len(list(tmp_path.rglob("*.kvb"))) == 7

    def fail(self: RecordIO, path: Path, *args: object) -> int:
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(RecordIO, "read", fail)
    monkeypatch.setattr(RecordIO, "write", fail)
    with LLMEngine(config) as restarted:
        out = run_one(restarted, A)
        got = stats(restarted)
        deadline = time.monotonic() + 10
        while list(tmp_path.rglob("*.kvb")) and time.monotonic() < deadline:
            restarted.step()  # the deletes go out with the next steps' jobs
            time.sleep(0.01)
        half = restarted.scheduler_connector
        assert isinstance(half, TieredOffloadScheduler) and len(half.disk.index) == 0
    assert out.num_external_tokens == 0 and got.get("disk_missing_records") == 7
    assert check(expected[tuple(A)], Trace.from_output(out)).ok
    assert not list(tmp_path.rglob("*.kvb"))


KILLED_WRITER = """
import os, sys, threading, time
sys.path.insert(0, {tests!r})
from test_disk_tier_engine import A, LLMEngine, PARAMS, disk_config, engine_config
from kvbridge.offload.disk.io import RecordIO
from pathlib import Path

real = RecordIO.write
calls = []
lock = threading.Lock()

def write(self, path, group, block_hash, parts):
    with lock:
        calls.append(path)
        n = len(calls)
    if n <= 3:
        return real(self, path, group, block_hash, parts)
    tmp = path.parent / ("." + path.name + ".killed.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(b"half a record")  # a write cut short, as the kill will leave it
    print("writing", flush=True)
    time.sleep(600)

RecordIO.write = write
engine = LLMEngine(engine_config(disk_config(Path({root!r}), n_write_threads=1)))
engine.add_request(A, PARAMS)
while True:
    engine.step()
    time.sleep(0.001)
"""


def test_a_server_killed_mid_write_restarts_on_the_whole_records(
    tmp_path: Path, expected: dict[tuple[int, ...], Trace]
) -> None:
    """SIGKILL while the 4th block's record is being written: a restarted engine finds the
    3 whole records (12 tokens from disk), never the cut one, and answers like recompute."""
    tests = str(Path(__file__).parent)
    code = KILLED_WRITER.format(tests=tests, root=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert len(list(tmp_path.rglob("*.kvb"))) == 3
    assert len(list(tmp_path.rglob("*.tmp"))) == 1
    with LLMEngine(engine_config(disk_config(tmp_path))) as restarted:
        out = run_one(restarted, A)
        got = stats(restarted)
    assert out.num_external_tokens == 12 and got.get("disk_hits") == 3
    assert not got.get("disk_corrupt_records")
    assert check(expected[tuple(A)], Trace.from_output(out)).ok
