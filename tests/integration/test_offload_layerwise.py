"""The CPU tier's ``load_mode: "layerwise"`` on the reference engine: a hit is loaded inside the
step that computes the request (never parked waiting for the load), layer chunk by layer chunk,
with the tokens and log-probabilities of recompute; a load that puts wrong KV in place is caught
by the oracle (control), and a load that fails to launch rolls the step back to recompute."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import pytest

from kvbridge.config import ConfigError, TransferConfig
from kvbridge.copy.backend import CopyHandle
from kvbridge.engine.engine import EngineConfig, LLMEngine
from kvbridge.engine.request import RequestOutput, RequestStatus
from kvbridge.engine.sampling import SamplingParams
from kvbridge.offload.connector import SimpleCPUOffloadConnector
from kvbridge.offload.worker import CPUOffloadWorker
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


def layerwise(connector: str = "SimpleCPUOffloadConnector", **extra: Any) -> TransferConfig:
    return TransferConfig(
        kv_connector=connector,
        kv_connector_module_path=None if connector == "SimpleCPUOffloadConnector" else __name__,
        kv_connector_extra_config={"num_cpu_blocks": 32, "load_mode": "layerwise", **extra},
    )


def run_one(engine: LLMEngine, tokens: list[int]) -> tuple[RequestOutput, set[RequestStatus]]:
    """One request to completion, every invariant checked after every step; also the statuses
    the request went through."""
    req_id = engine.add_request(tokens, PARAMS)
    final, seen = None, set()
    for _ in range(500):
        if not (engine.has_unfinished_requests() or engine.has_pending_transfers()):
            break
        for out in engine.step():
            if out.request_id == req_id and out.finished:
                final = out
        request = engine.scheduler.requests.get(req_id)
        if request is not None:
            seen.add(request.status)
        engine.check_integrity()
    assert final is not None and final.error is None
    return final, seen


A = prompt(30, seed=1)  # 7 full blocks before the last token
FILLERS = [prompt(30, seed=10 + i) for i in range(2)]  # each evicts A from the 12-block GPU


@pytest.fixture(scope="module")
def expected() -> dict[tuple[int, ...], Trace]:
    return reference([A], engine_config(None, num_gpu_blocks=64), max_tokens=6)


def _evict_and_reload(engine: LLMEngine) -> tuple[RequestOutput, set[RequestStatus]]:
    run_one(engine, A)
    for f in FILLERS:
        run_one(engine, f)
    return run_one(engine, A)


def test_layerwise_hit_computes_in_its_step_with_recompute_logprobs(
    expected: dict[tuple[int, ...], Trace],
) -> None:
    with LLMEngine(engine_config(layerwise())) as engine:
        again, seen = _evict_and_reload(engine)
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert again.num_external_tokens == 28  # every full block but the last token's
    assert RequestStatus.WAITING_FOR_REMOTE_KVS not in seen  # never parked on the load
    verdict = check(expected[tuple(A)], Trace.from_output(again))
    assert verdict.ok, verdict.problem


class _Misloading(CPUOffloadWorker):
    """Layerwise loads read the CPU blocks of another prompt (the oracle's control)."""

    def _launch_layerwise(
        self, group: int, cpu_ids: list[int], gpu_ids: list[int], nbytes: int
    ) -> CopyHandle:
        pool = self.offload.num_cpu_blocks
        wrong = [(b + len(cpu_ids)) % pool for b in cpu_ids]  # another prompt's blocks
        return super()._launch_layerwise(group, wrong, gpu_ids, nbytes)


class MisloadingLayerwiseConnector(SimpleCPUOffloadConnector):
    worker_cls = _Misloading


class _FailingLaunch(CPUOffloadWorker):
    """Layerwise loads fail to launch (e.g. the CUDA call raises)."""

    launches = 0

    def _launch_layerwise(
        self, group: int, cpu_ids: list[int], gpu_ids: list[int], nbytes: int
    ) -> CopyHandle:
        type(self).launches += 1
        raise RuntimeError("injected: the layerwise load could not be queued")


class FailingLayerwiseConnector(SimpleCPUOffloadConnector):
    worker_cls = _FailingLaunch


def test_control_wrong_kv_through_layerwise_loads_is_flagged(
    expected: dict[tuple[int, ...], Trace],
) -> None:
    with LLMEngine(engine_config(layerwise("MisloadingLayerwiseConnector"))) as engine:
        again, _ = _evict_and_reload(engine)
    assert again.num_external_tokens == 28
    assert not check(expected[tuple(A)], Trace.from_output(again)).ok


def test_failed_layerwise_launch_rolls_back_to_recompute(
    expected: dict[tuple[int, ...], Trace],
) -> None:
    _FailingLaunch.launches = 0
    with LLMEngine(engine_config(layerwise("FailingLayerwiseConnector"))) as engine:
        again, _ = _evict_and_reload(engine)
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert _FailingLaunch.launches >= 1
    verdict = check(expected[tuple(A)], Trace.from_output(again))
    assert verdict.ok, verdict.problem


class _SkipsAWait(CPUOffloadWorker):
    """The forward never waits for the first layer's chunk (a replayed full CUDA graph)."""

    def wait_for_layer_load(self, layer_name: str) -> None:
        if layer_name != self._group_names[0][0]:
            super().wait_for_layer_load(layer_name)


class SkipsAWaitConnector(SimpleCPUOffloadConnector):
    worker_cls = _SkipsAWait


def test_a_chunk_never_waited_for_fails_the_load_and_the_step_recomputes(
    expected: dict[tuple[int, ...], Trace],
) -> None:
    with LLMEngine(engine_config(layerwise("SkipsAWaitConnector"))) as engine:
        again, _ = _evict_and_reload(engine)
        stats = engine.kv_connector_stats
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert stats is not None and stats.data.get("cpu_to_gpu_failed_jobs", 0) >= 1
    verdict = check(expected[tuple(A)], Trace.from_output(again))
    assert verdict.ok, verdict.problem


class _Ordered(CopyHandle):
    """A finished copy that records when the compute stream was ordered after it."""

    def __init__(self, log: list[int], chunk: int) -> None:
        self.log, self.chunk = log, chunk

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        return None

    def order_before_current(self) -> None:
        self.log.append(self.chunk)


def test_each_layer_waits_for_its_own_chunk_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # One layer per chunk (chunks of at least 1 byte): the reload step orders layer i's compute
    # after chunk i's copy, once, in layer order, and never after another chunk.
    monkeypatch.setattr("kvbridge.offload.worker.LAYER_CHUNK_BYTES", 1)
    with LLMEngine(engine_config(layerwise())) as engine:
        worker = engine.worker_connector
        assert isinstance(worker, CPUOffloadWorker)
        backend = worker.backends[0]
        log: list[int] = []
        chunks_seen: list[Sequence[tuple[int, int]]] = []

        def load_layers(
            cpu_ids: Sequence[int], gpu_ids: Sequence[int], chunks: Sequence[tuple[int, int]]
        ) -> list[CopyHandle]:
            backend.load(cpu_ids, gpu_ids).wait()
            chunks_seen.append(chunks)
            return [_Ordered(log, c) for c in range(len(chunks))]

        backend.load_layers = load_layers  # type: ignore[method-assign]
        num_layers = engine.model_config.num_layers
        _evict_and_reload(engine)
    assert num_layers > 1
    assert chunks_seen == [[(i, i + 1) for i in range(num_layers)]]  # one reload, layer by layer
    assert log == list(range(num_layers))


def test_load_mode_is_checked_at_parse_time() -> None:
    bad = layerwise(load_mode="per-layer")
    with pytest.raises(ConfigError, match="load_mode: 'per-layer' is not one of async, layerwise"):
        LLMEngine(engine_config(bad))
