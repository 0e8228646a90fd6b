"""Builders shared by the engine tests: tiny engines, prompts, reference K/V, checked stepping."""

from __future__ import annotations

import itertools
import random
from typing import Any

import torch

from kvbridge.config import TransferConfig
from kvbridge.engine.engine import EngineConfig, LLMEngine
from kvbridge.engine.model_config import NAMED_CONFIGS
from kvbridge.engine.request import RequestOutput
from kvbridge.engine.runner import ModelRunner, SeqChunk
from kvbridge.engine.sampling import SamplingParams

TINY = NAMED_CONFIGS["tiny"]
BS = 4
GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)
_keys = itertools.count()


def prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(n)]


def engine(**kw: Any) -> LLMEngine:
    args: dict[str, Any] = {"block_size": BS, "num_gpu_blocks": 64, "max_model_len": 128, **kw}
    return LLMEngine(EngineConfig(**args))


def scripted(**extra: Any) -> TransferConfig:
    """A ScriptedConnector config with a fresh log key (returned in the extra config)."""
    extra.setdefault("log", f"log-{next(_keys)}")
    policy = extra.pop("policy", "recompute")
    return TransferConfig(
        kv_connector="ScriptedConnector",
        kv_connector_module_path="engine_fake_connector",
        kv_connector_extra_config=extra,
        kv_load_failure_policy=policy,
    )


def run(eng: LLMEngine, max_steps: int = 500) -> dict[str, RequestOutput]:
    """Step until nothing is left (delayed frees included), checking the pool after each step."""
    final: dict[str, RequestOutput] = {}
    for _ in range(max_steps):
        if not (eng.has_unfinished_requests() or eng.has_pending_transfers()):
            return final
        for out in eng.step():
            if out.finished:
                assert out.request_id not in final, f"{out.request_id} finished twice"
                final[out.request_id] = out
        eng.check_integrity()
    raise AssertionError(f"not done after {max_steps} steps")


def generate(eng: LLMEngine, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list:
    ids = [eng.add_request(p, params) for p in prompts]
    final = run(eng)
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    return [final[i].token_ids for i in ids]


def reference_kv(p: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-layer K/V of ``p`` from a plain prefill: ``[len(p), 2, kv_heads, head_dim]``."""
    nblocks = -(-len(p) // BS)
    runner = ModelRunner(TINY, num_blocks=nblocks, block_size=BS, seed=seed)
    runner.execute([SeqChunk("ref", p, 0, list(range(nblocks)), True)])
    out = {}
    for name, cache in runner.kv_caches.items():
        # [blocks, 2, bs, h, d] -> [blocks * bs, 2, h, d]
        flat = cache.permute(0, 2, 1, 3, 4).reshape(nblocks * BS, 2, *cache.shape[3:])
        out[name] = flat[: len(p)].clone()
    return out
