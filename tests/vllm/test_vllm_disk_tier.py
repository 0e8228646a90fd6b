"""kvbridge's disk tier inside real vLLM, configured with vLLM's own disk keys: a restarted
vLLM serves a prompt from the records the first one wrote.

Oracle: greedy tokens and log-probabilities equal vLLM's without any connector within
``LOGPROB_TOL``; the restarted engine's only source for the prefix is the disk (its GPU cache
and CPU tier start empty).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from vllm_engines import Completion, complete, engine, kv_config, logprob_gap, wait_until

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]  # engines start slowly on 2 cores

PROMPT = [(7 * i + 3) % 500 + 1 for i in range(199)]  # six full blocks of 32, then 7 tokens
LOGPROB_TOL = 0.05


def disk_config(root: Path) -> dict[str, Any]:
    extra = {
        "cpu_bytes_to_use": 64 << 20,
        "kv_offload_backend": "disk",
        "disk_path": str(root),
        "disk_capacity_bytes": 1 << 30,
        "disk_buffer_slots": 2,
        "use_page_cache": False,
        "n_read_threads": 2,
        "n_write_threads": 2,
    }
    return kv_config("KVBridgeCPUOffloadConnector", extra)


def test_a_restarted_vllm_serves_the_prompt_from_disk(tiny_llama: Path, tmp_path: Path) -> None:
    with engine(tiny_llama) as llm:
        baseline: Completion = complete(llm, PROMPT)
    with engine(tiny_llama, disk_config(tmp_path)) as llm:
        first = complete(llm, PROMPT)
        wait_until(lambda: len(list(tmp_path.rglob("*.kvb"))) >= 6, "six block records")
    with engine(tiny_llama, disk_config(tmp_path)) as llm:
        again = complete(llm, PROMPT)
    assert first.num_cached_tokens == 0
    assert again.num_cached_tokens == 192  # six blocks read back from disk, then loaded
    assert logprob_gap(baseline, first) <= LOGPROB_TOL
    assert logprob_gap(baseline, again) <= LOGPROB_TOL, (baseline, again)
