"""The oracle: greedy tokens of a monolithic in-process engine (same model and seed, no
connector) for every prompt the demo sent, compared with what the P/D stack answered."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from kvbridge.demo.workload import RequestRecord

logger = logging.getLogger(__name__)

Tokens = tuple[int, ...]


class Mismatch(NamedTuple):
    """A request whose served tokens differ from the monolithic engine's."""

    record: RequestRecord
    expected: Tokens


def reference_outputs(
    prompts: Iterable[Tokens],
    *,
    model: str,
    device: str,
    seed: int,
    max_tokens: int,
    block_size: int,
    cpu_threads: int | None = None,
) -> dict[Tokens, Tokens]:
    """prompt -> greedy answer of an ``LLMEngine`` without a connector (each prompt once).

    ``cpu_threads``: torch's thread count on CPU, as the servers run (idle OpenMP threads
    spinning on a busy machine slow a tiny model down a hundredfold).
    """
    import torch

    from kvbridge.engine.engine import EngineConfig, LLMEngine
    from kvbridge.engine.sampling import SamplingParams

    unique = list(dict.fromkeys(prompts))
    if not unique:
        return {}
    longest = max(len(p) for p in unique) + max_tokens
    config = EngineConfig(
        model=model,
        device=device,
        seed=seed,
        block_size=block_size,
        num_gpu_blocks=max(256, 2 * math.ceil(longest / block_size)),
    )
    if device == "cpu" and cpu_threads is not None:
        torch.set_num_threads(cpu_threads)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    with LLMEngine(config) as engine:
        outputs = engine.generate([list(p) for p in unique], params)
    return {p: tuple(out.token_ids) for p, out in zip(unique, outputs)}


def compare(
    records: Sequence[RequestRecord], expected: dict[Tokens, Tokens]
) -> tuple[int, list[Mismatch]]:
    """(how many answers equal the oracle's, the ones that do not); a failed request counts
    as a mismatch."""
    mismatches = [
        Mismatch(r, expected.get(r.prompt, ()))
        for r in records
        if r.error is not None or expected.get(r.prompt) != r.token_ids
    ]
    return len(records) - len(mismatches), mismatches
