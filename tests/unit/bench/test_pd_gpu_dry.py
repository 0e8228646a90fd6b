"""``benchmarks.pd_gpu`` on the CPU: real servers and proxy, both NIXL modes, tokens checked."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import pd_gpu
from benchmarks.nixl_modes import visible_gpus
from kvbridge.engine.model_config import NAMED_CONFIGS
from support.nixl_marks import needs_nixl


def test_serve_configs_put_the_mode_on_the_nixl_child_and_keep_mono_local() -> None:
    args = pd_gpu.parse_args(["--prompt-lens", "2048,8192"])
    prefill = pd_gpu.serve_config(args, "kv_producer", "cpu", 530)
    nixl, offload = prefill["kv_transfer_config"]["kv_connector_extra_config"]["connectors"]
    assert (nixl["kv_connector"], nixl["kv_role"]) == ("NixlConnector", "kv_producer")
    assert nixl["kv_buffer_device"] == "cpu"
    assert offload["kv_connector"] == "SimpleCPUOffloadConnector"
    assert prefill["dtype"] == "bfloat16" and prefill["max_num_batched_tokens"] == 8192
    assert prefill["enable_prefix_caching"] is True
    mono = pd_gpu.serve_config(args, "monolithic", "", 530)
    assert mono["kv_transfer_config"]["kv_connector"] == "SimpleCPUOffloadConnector"
    cpu = pd_gpu.parse_args(["--device", "cpu", "--model", "tiny"])
    assert "dtype" not in pd_gpu.serve_config(cpu, "kv_consumer", "cuda", 64)


def test_prompts_are_distinct_and_the_same_for_every_mode() -> None:
    args = pd_gpu.parse_args(["--device", "cpu", "--prompt-lens", "64,128", "--repeats", "2"])
    prompts = pd_gpu.make_prompts(args, 512)
    assert {n: len(g) for n, g in prompts.items()} == {64: 3, 128: 3}
    flat = [tuple(p) for g in prompts.values() for p in g]
    assert len(set(flat)) == len(flat)
    assert all(len(p) == n for n, g in prompts.items() for p in g)
    assert pd_gpu.make_prompts(args, 512) == prompts


@needs_nixl
@pytest.mark.skipif(visible_gpus() >= 1, reason="a GPU is visible")
def test_cuda_needs_a_gpu_and_one_gpu_defaults_to_sharing_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert pd_gpu.main(["--device", "cuda"]) == 2
    assert "needs a GPU; none visible" in capsys.readouterr().err
    assert pd_gpu.parse_args(["--device", "cuda"]).gpus == [0, 0]  # P, D and mono share it
    assert pd_gpu.main(["--device", "cuda", "--gpus", "0,3"]) == 2


@needs_nixl
@pytest.mark.integration
@pytest.mark.timeout(120)
def test_dry_run_both_modes_same_tokens_and_kv_bytes_from_metrics(tmp_path: Path) -> None:
    out = tmp_path / "pd.json"
    argv = ["--device", "cpu", "--model", "tiny", "--prompt-lens", "64,128,5000"]
    assert pd_gpu.main([*argv, "--repeats", "1", "--max-tokens", "8", "--json", str(out)]) == 0
    result = json.loads(out.read_text())["reports"]["pd-gpu"]
    assert result["notes"][0] == "skipped 5000 tokens: tiny holds 4096 positions"
    assert "D's tokens equal the monolithic engine's, KV read from P: True" in result["notes"]
    rows = result["rows"]
    assert [(r["mode"], r["prompt_tokens"]) for r in rows] == [
        ("direct", 64), ("direct", 128), ("staged", 64), ("staged", 128),
    ]  # fmt: skip
    tiny = NAMED_CONFIGS["tiny"]
    block_layer = 2 * 16 * tiny.num_kv_heads * tiny.head_dim * 4  # K and V, float32
    for r in rows:
        assert r["same_tokens"] == r["compared"] == 1 and r["tokens_per_request"] == 8
        assert r["same_as_mono_hit"] == r["mono_hit_same"] == 1 and r["first_difference"] == [-1]
        assert r["remote_tokens_ok"]
        blocks = math.ceil(r["prompt_tokens"] / 16)
        assert r["kv_mib"] * 2**20 == blocks * tiny.num_layers * block_layer
        assert r["read_ms"] > 0 and r["ttft_disagg_ms"] > 0 and r["ttft_mono_ms"] > 0
        assert r["prefill_round_trip_ms"] > 0 and r["d_ttft_ms"] > 0
        assert r["ucx_read_lanes"]
    assert pd_gpu.modes_agree(rows) is True
    staged = [r for r in rows if r["mode"] == "staged"]
    assert all(r["d_connector_ms"] > r["read_ms"] for r in staged)  # + confirm + stage-in


def test_first_difference_and_mode_agreement_find_the_first_disagreement() -> None:
    assert pd_gpu.first_difference((1, 2, 3), (1, 2, 3)) == -1
    assert pd_gpu.first_difference((1, 2, 3), (1, 5, 3)) == 1
    assert pd_gpu.first_difference((1, 2), (1, 2, 3)) == 2
    row = {"prompt_tokens": 8, "d_tokens": [[1, 2]]}
    assert pd_gpu.modes_agree([row]) is None
    assert pd_gpu.modes_agree([row, {**row, "d_tokens": [[1, 2]]}]) is True
    assert pd_gpu.modes_agree([row, {**row, "d_tokens": [[1, 3]]}]) is False
