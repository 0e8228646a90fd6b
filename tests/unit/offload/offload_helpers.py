"""Builders and a two-halves driver shared by the CPU offload tests (no engine)."""

from __future__ import annotations

from typing import Any

import torch

from kvbridge.config import TransferConfig
from kvbridge.connector.types import (
    BlockIds,
    KVCacheGroupSpec,
    KVCacheSpec,
    ScheduledRequest,
    SimpleRequest,
)
from kvbridge.copy.backend import CopyHandle
from kvbridge.kit.driver import ConnectorDriver
from support.hashes import block_hashes

BLOCK_SIZE = 4


def spec(num_blocks: int = 16, num_layers: int = 2, **kw: Any) -> KVCacheSpec:
    values: dict[str, Any] = {
        "block_size": BLOCK_SIZE,
        "num_blocks": num_blocks,
        "num_layers": num_layers,
        "num_kv_heads": 2,
        "head_dim": 8,
        "dtype": "float32",
    }
    values.update(kw)
    return KVCacheSpec(**values)


# Hybrid cache of the HMA tests: a full-attention group of two layers and a sliding-window group
# of one layer; the token after a hit reads the WINDOW - 1 = 8 tokens before it (2 blocks).
WINDOW = 9
HYBRID_GROUPS = (
    KVCacheGroupSpec("full", ("layers.0", "layers.2")),
    KVCacheGroupSpec("swa", ("layers.1",), "sliding_window", WINDOW),
)


def hybrid_spec(num_blocks: int = 16) -> KVCacheSpec:
    return spec(num_blocks=num_blocks, num_layers=3, groups=HYBRID_GROUPS)


def config(**extra: Any) -> TransferConfig:
    extra.setdefault("num_cpu_blocks", 8)
    return TransferConfig(kv_connector="SimpleCPUOffloadConnector", kv_connector_extra_config=extra)


def request(req_id: str, tokens: list[int], output: list[int] | None = None) -> SimpleRequest:
    req = SimpleRequest(request_id=req_id, prompt_token_ids=list(tokens))
    req.output_token_ids = list(output or [])
    req.block_hashes = block_hashes(req.all_token_ids, BLOCK_SIZE)
    return req


def scheduled(
    req: SimpleRequest, blocks: list[int], num_computed: int, num_scheduled: int
) -> ScheduledRequest:
    return ScheduledRequest(req, (list(blocks),), num_computed, num_scheduled)


def scheduled_groups(
    req: SimpleRequest, blocks: BlockIds, num_computed: int, num_scheduled: int
) -> ScheduledRequest:
    return ScheduledRequest(req, tuple(list(b) for b in blocks), num_computed, num_scheduled)


# Runs scheduler and worker halves step by step the way an engine would (SPEC §1).
Driver = ConnectorDriver


def kv_caches(s: KVCacheSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (s.num_blocks, 2, s.block_size, s.num_kv_heads, s.head_dim)
    return {f"layers.{i}": torch.randn(shape, generator=gen) for i in range(s.num_layers)}


class Later(CopyHandle):
    """Completes after ``polls`` calls of done(): an async copy, as on CUDA."""

    def __init__(self, polls: int) -> None:
        self.polls = polls

    def done(self) -> bool:
        self.polls -= 1
        return self.polls < 0

    def wait(self) -> None:
        self.polls = -1
