"""``benchmarks.nixl_modes`` on the CPU: both modes end to end in two real processes each."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import pytest

from benchmarks import nixl_modes
from benchmarks.nixl_modes_peer import make_spec
from support.nixl_marks import needs_nixl

CPU_ARGS = ["--device", "cpu", "--tokens", "256", "--layers", "2", "--iters", "2"]


def _args(*extra: str) -> argparse.Namespace:
    return nixl_modes.parse_args([*CPU_ARGS, *extra])


def test_geometry_leaves_one_block_out_after_each_run() -> None:
    geo = nixl_modes.geometry(_args("--run-blocks", "4"))
    assert len(geo.block_ids) == 16
    assert geo.block_ids[:9] == (0, 1, 2, 3, 5, 6, 7, 8, 10)
    assert geo.num_blocks == geo.block_ids[-1] + 1 == 19
    whole = nixl_modes.geometry(_args())
    assert whole.block_ids == tuple(range(16)) and whole.num_blocks == 16
    spec = make_spec(whole)
    assert spec.block_bytes_per_layer == 64 * 1024  # Llama-3-8B: 16 tokens x 8 heads x 128, bf16


def test_cpu_defaults_are_small_and_cuda_defaults_are_llama_8k() -> None:
    cpu = nixl_modes.parse_args(["--device", "cpu"])
    assert (cpu.tokens, cpu.layers, cpu.modes) == (1024, 4, ["direct", "staged"])
    cuda = nixl_modes.parse_args([])
    assert (cuda.tokens, cuda.layers) == (8192, 32)
    assert cuda.modes == list(nixl_modes.MODES)
    with pytest.raises(SystemExit):
        nixl_modes.parse_args(["--modes", "direct,warp"])


def test_summary_flags_a_ratio_below_target() -> None:
    base = {"holds_released": 3, "holds": 3, "correct": True}
    rows = [
        {**base, "mode": "direct", "ratio": 0.95, "connector_gbps": 0.4},
        {**base, "mode": "staged", "ratio": 0.8, "connector_gbps": 4.0},
        {"mode": "staged-p", "error": "TimeoutError: boom"},
    ]
    lines = nixl_modes.summary(rows)
    assert "FAILED staged-p: TimeoutError: boom" in lines
    assert any("MISSED (lowest 0.80, staged)" in line for line in lines)
    assert "host-staged / direct connector GB/s: 10.00x" in lines


@pytest.mark.skipif(nixl_modes.visible_gpus() > 0, reason="a GPU is visible")
def test_cuda_without_a_gpu_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert nixl_modes.main(["--device", "cuda"]) == 2
    assert "no GPU is visible" in capsys.readouterr().out


@needs_nixl
@pytest.mark.integration
@pytest.mark.timeout(120)
def test_both_modes_move_the_producers_bytes_in_merged_descriptors(tmp_path: Path) -> None:
    out = tmp_path / "modes.json"
    assert nixl_modes.main([*CPU_ARGS, "--run-blocks", "4", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["reports"]["nixl-modes"]["rows"]
    assert [r["mode"] for r in rows] == ["direct", "staged"]
    for r in rows:
        assert "error" not in r, r
        assert r["correct"], r
        assert r["holds_released"] == r["holds"] == 3
        assert r["memory"] == "DRAM->DRAM"
        assert r["nbytes"] == 16 * 2 * 64 * 1024
        # 16 blocks in runs of 4 on both sides: one descriptor per run per layer
        assert r["descs_connector"] == r["descs_raw"] == 4 * 2
        assert r["connector_gbps"] > 0 and r["raw_gbps"] > 0
        assert r["ratio"] == pytest.approx(r["connector_gbps"] / r["raw_gbps"])
    direct, staged = rows
    assert direct["stage_in_ms"] == 0.0
    assert staged["stage_in_ms"] > 0.0 and staged["stage_out_ms"] > 0.0


@needs_nixl
@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_mode_that_fails_is_reported_and_the_exit_code_says_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = nixl_modes.main([*CPU_ARGS, "--modes", "direct", "--timeout", "0.01"])
    out = capsys.readouterr().out
    logs = re.search(r"nixl-modes logs: (\S+)", out)
    assert logs is not None, out  # kept for a failed run, and named
    shutil.rmtree(logs.group(1))
    assert code == 1
    assert "FAILED direct: TimeoutError" in out
