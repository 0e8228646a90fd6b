"""Prefill (P) and decode (D) reference engines in one process, linked by a ``FaultyFabric``.

The side channel is real (zmq on 127.0.0.1); NIXL is the fabric's linked fakes, so READs copy
real bytes and faults can be injected per call. A monolithic engine with the same weights is
the oracle: D's greedy tokens must equal its tokens for the same prompt.
"""

from __future__ import annotations

import functools
import random
import time
from typing import Any

from kvbridge.config import TransferConfig
from kvbridge.engine.engine import EngineConfig, LLMEngine
from kvbridge.engine.request import RequestOutput
from kvbridge.engine.sampling import SamplingParams
from reliability.fabric import FaultyFabric

BS = 4
NUM_BLOCKS = 48
MAX_TOKENS = 6
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
PREFILL = SamplingParams(max_tokens=1, ignore_eos=True)
# Small lease and timeouts so every lapse is observable within a second or two.
FAST = {
    "kv_lease_duration_s": 0.6,
    "heartbeat_interval_s": 0.1,
    "abort_timeout_s": 3.0,
    "transfer_timeout_s": 2.0,
}


def prompt(seed: int, n: int | None = None) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(n or rng.randrange(BS + 1, 6 * BS))]


def engine(transfer: TransferConfig | None = None, blocks: int = NUM_BLOCKS) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model="tiny",
            block_size=BS,
            num_gpu_blocks=blocks,
            max_num_seqs=16,
            max_model_len=128,
            kv_transfer_config=transfer,
        )
    )


@functools.lru_cache(maxsize=1)
def _mono() -> LLMEngine:
    return engine()


def expected(p: list[int]) -> list[int]:
    """The monolithic engine's greedy tokens (memoised per prompt)."""
    return list(_expected(tuple(p)))


@functools.lru_cache(maxsize=256)
def _expected(p: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(_mono().generate([list(p)], GREEDY)[0].token_ids)


def nixl(
    role: str, engine_id: str, fabric: FaultyFabric, policy: str = "recompute", **extra: Any
) -> TransferConfig:
    return TransferConfig(
        kv_connector="NixlConnector",
        kv_role=role,  # type: ignore[arg-type]
        engine_id=engine_id,
        kv_load_failure_policy=policy,  # type: ignore[arg-type]
        kv_connector_extra_config={
            "side_channel_port": 0,
            "nixl_wrapper": fabric.factory,
            **FAST,
            **extra,
        },
    )


class PD:
    """A producer and a consumer engine, stepped by the test."""

    def __init__(self, fabric: FaultyFabric, policy: str = "recompute", **extra: Any) -> None:
        self.fabric = fabric
        self.p = engine(nixl("kv_producer", "prefill", fabric, **extra))
        self.d = engine(nixl("kv_consumer", "decode", fabric, policy, **extra))

    def prefill(self, rid: str, p: list[int], engine: LLMEngine | None = None) -> dict[str, Any]:
        """Run ``p`` on the producer; its remote-prefill params (it now holds the blocks)."""
        producer = engine or self.p
        producer.add_request(p, PREFILL, rid, {"do_remote_decode": True})
        deadline = time.monotonic() + 10
        while True:
            for out in producer.step():
                if out.finished:
                    assert out.kv_transfer_params is not None, out
                    return out.kv_transfer_params
            assert time.monotonic() < deadline, "prefill did not finish"

    def decode(
        self,
        reqs: dict[str, tuple[list[int], dict[str, Any]]],
        timeout_s: float = 15.0,
        producer: LLMEngine | None = None,
    ) -> dict[str, RequestOutput]:
        """Run requests on the consumer (stepping the producer too) until all have ended."""
        for rid, (p, params) in reqs.items():
            self.d.add_request(p, GREEDY, rid, params)
        finals: dict[str, RequestOutput] = {}
        deadline = time.monotonic() + timeout_s
        while len(finals) < len(reqs):
            assert time.monotonic() < deadline, f"decode stuck: {sorted(set(reqs) - set(finals))}"
            for out in self.d.step():
                if out.finished:
                    finals[out.request_id] = out
            self.d.check_integrity()
            p = producer or self.p
            if p.has_unfinished_requests() or p.has_pending_transfers():
                p.step()
            time.sleep(0.0005)
        return finals

    def wait_producer_free(self, timeout_s: float, engine: LLMEngine | None = None) -> float:
        """Step the producer until it holds no blocks; seconds it took."""
        p = engine or self.p
        start = time.monotonic()
        while p.has_pending_transfers() or p.has_unfinished_requests():
            assert time.monotonic() - start < timeout_s, "producer still holds blocks"
            p.step()
            p.check_integrity()
            time.sleep(0.002)
        return time.monotonic() - start
