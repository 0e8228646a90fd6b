"""kvbridge's CPU tier inside real vLLM: a prompt evicted from vLLM's cache comes back from it.

Oracle: the greedy tokens and their log-probabilities equal those of vLLM without any
connector, within ``LOGPROB_TOL`` (bf16 attention over a reloaded vs a recomputed prefix).
Control: the same run through a CPU tier that loads the wrong blocks must break the oracle.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from vllm_engines import Completion, complete, engine, kv_config, logprob_gap, wait_until

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]  # engines start slowly on 2 cores

# 199 tokens: six full blocks of 32 come back from the CPU tier, the last 7 are computed.
PROMPT = [(7 * i + 3) % 500 + 1 for i in range(199)]
OTHER = [(11 * i + 5) % 500 + 1 for i in range(120)]
LOGPROB_TOL = 0.05
CPU_BYTES = 64 << 20


@pytest.fixture(scope="module")
def baseline(tiny_llama: Path) -> Completion:
    with engine(tiny_llama) as llm:
        return complete(llm, PROMPT)


def offload_config() -> dict[str, Any]:
    return kv_config("KVBridgeCPUOffloadConnector", {"cpu_bytes_to_use": CPU_BYTES})


def misloading_config() -> dict[str, Any]:
    child = {
        "kv_connector": "MisloadingCPUOffloadConnector",
        "kv_connector_module_path": "support.faulty_offload",
        "kv_connector_extra_config": {"cpu_bytes_to_use": CPU_BYTES},
    }
    return kv_config("KVBridgeMultiConnector", {"connectors": [child]})


def reload_from_cpu(llm: Any) -> tuple[Completion, Completion]:
    """Run PROMPT, evict it from vLLM's own cache, run it again: (first, reloaded)."""
    first = complete(llm, PROMPT)
    complete(llm, OTHER)
    wait_until(llm.reset_prefix_cache, "vLLM to drop its prefix cache")
    return first, complete(llm, PROMPT)


def counter(name: str, connector: str) -> float:
    total = 0.0
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            if sample.name == name and sample.labels.get("connector") == connector:
                total += sample.value
    return total


@pytest.fixture(scope="module")
def offload_runs(tiny_llama: Path) -> Iterator[tuple[Completion, Completion, float]]:
    with engine(tiny_llama, offload_config()) as llm:
        before = counter("kvbridge:cpu_hit_tokens_total", "SimpleCPUOffloadConnector")
        first, reloaded = reload_from_cpu(llm)
        hits = counter("kvbridge:cpu_hit_tokens_total", "SimpleCPUOffloadConnector") - before
        yield first, reloaded, hits


def test_a_prompt_evicted_from_vllm_comes_back_from_the_cpu_tier_unchanged(
    baseline: Completion, offload_runs: tuple[Completion, Completion, float]
) -> None:
    first, reloaded, hits = offload_runs
    assert first.num_cached_tokens == 0  # nothing cached anywhere the first time
    assert reloaded.num_cached_tokens == 192  # six blocks, all from the CPU tier
    assert hits == 192  # kvbridge's own counter, read from the Prometheus registry
    assert logprob_gap(baseline, first) <= LOGPROB_TOL
    assert logprob_gap(baseline, reloaded) <= LOGPROB_TOL, (baseline, reloaded)


def test_control_a_cpu_tier_that_loads_wrong_blocks_breaks_the_oracle(
    tiny_llama: Path, baseline: Completion
) -> None:
    with engine(tiny_llama, misloading_config()) as llm:
        first, reloaded = reload_from_cpu(llm)
    assert logprob_gap(baseline, first) <= LOGPROB_TOL  # computed by vLLM: still right
    assert reloaded.num_cached_tokens == 192  # the broken tier did serve the prompt ...
    assert logprob_gap(baseline, reloaded) > LOGPROB_TOL  # ... and the oracle sees it


def layerwise_configs() -> tuple[dict[str, Any], dict[str, Any]]:
    """The CPU tier with ``load_mode: layerwise``, right and misloading (the control)."""
    extra = {"cpu_bytes_to_use": CPU_BYTES, "load_mode": "layerwise"}
    right = kv_config("KVBridgeCPUOffloadConnector", extra)
    child = {
        "kv_connector": "MisloadingCPUOffloadConnector",
        "kv_connector_module_path": "support.faulty_offload",
        "kv_connector_extra_config": extra,
    }
    return right, kv_config("KVBridgeMultiConnector", {"connectors": [child]})


def test_layerwise_hits_compute_in_vllms_step_and_a_wrong_load_breaks_the_oracle(
    tiny_llama: Path, baseline: Completion
) -> None:
    # vLLM schedules the hit's last tokens in the step that loads it (load_kv_async=False)
    right, wrong = layerwise_configs()
    with engine(tiny_llama, right) as llm:
        _, reloaded = reload_from_cpu(llm)
    assert reloaded.num_cached_tokens == 192
    assert logprob_gap(baseline, reloaded) <= LOGPROB_TOL, (baseline, reloaded)
    with engine(tiny_llama, wrong) as llm:
        _, misloaded = reload_from_cpu(llm)
    assert misloaded.num_cached_tokens == 192
    assert logprob_gap(baseline, misloaded) > LOGPROB_TOL
