"""ModelRunner on CUDA computes what it computes on the CPU (skipped without a GPU)."""

from __future__ import annotations

import random

import pytest
import torch

from kvbridge.engine.model_config import NAMED_CONFIGS
from kvbridge.engine.runner import ModelRunner, SeqChunk

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CONFIG = NAMED_CONFIGS["small"]


def _steps() -> list[list[SeqChunk]]:
    rng = random.Random(0)
    a, b, c = ([rng.randrange(CONFIG.vocab_size) for _ in range(n)] for n in (37, 64, 5))
    ta, tb, tc = list(range(0, 8)), list(range(8, 16)), list(range(16, 18))
    return [
        [SeqChunk("a", a[:20], 0, ta, False), SeqChunk("b", b, 0, tb, True)],
        [SeqChunk("a", a[20:], 20, ta, True), SeqChunk("b", [3], 64, tb, True)],
        [
            SeqChunk("b", [4], 65, tb, True),
            SeqChunk("c", c, 0, tc, True),
            SeqChunk("a", [9], 37, ta, True),
        ],
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(dtype: torch.dtype) -> None:
    cpu = ModelRunner(CONFIG, num_blocks=24, block_size=16, seed=1)
    gpu = ModelRunner(CONFIG, num_blocks=24, block_size=16, seed=1, device="cuda", dtype=dtype)
    assert gpu.kv_caches["layers.0"].device.type == "cuda"
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for chunks in _steps():
        want = cpu.execute(chunks)
        got = gpu.execute(chunks)
        assert got.dtype == torch.float32 and got.device.type == "cuda"
        rel = ((got.cpu() - want).abs().max() / want.abs().max()).item()
        assert rel < tol, f"relative error {rel:.2e}"
