"""``benchmarks.ttft`` and ``benchmarks.gpu_suite`` on the CPU, at tiny sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import gpu_suite, ttft


def test_ttft_reloads_every_block_but_the_last_and_answers_the_same(tmp_path: Path) -> None:
    out = tmp_path / "ttft.json"
    argv = ["--prompt-lens", "16,32", "--repeats", "1", "--block-size", "4"]
    argv += ["--load-modes", "async,layerwise"]
    assert ttft.main([*argv, "--decode-tokens", "3", "--json", str(out)]) == 0
    report = json.loads(out.read_text())["reports"]["ttft"]
    assert [(r["load_mode"], r["prompt_len"]) for r in report["rows"]] == [
        ("async", 16),
        ("async", 32),
        ("layerwise", 16),
        ("layerwise", 32),
    ]
    for r in report["rows"]:
        assert r["same_token"] and r["reloaded_tokens"] == r["prompt_len"] - 4
        assert r["recompute_ms"] > 0 and r["reload_ms"] > 0 and r["gpu_hit_ms"] > 0
    assert report["notes"][0].startswith("decode, batch 1 after a 16-token prompt: ")


def test_ttft_with_a_disk_tier_answers_a_restarted_engine_from_disk(tmp_path: Path) -> None:
    out = tmp_path / "ttft.json"
    argv = ["--prompt-lens", "32", "--repeats", "1", "--block-size", "4"]
    argv += ["--disk-tier", str(tmp_path / "disk"), "--json", str(out)]
    assert ttft.main(argv) == 0
    (row,) = json.loads(out.read_text())["reports"]["ttft"]["rows"]
    assert row["same_token"] and row["disk_tokens"] == 28 and row["disk_ms"] > 0


def test_ttft_rejects_bad_lengths() -> None:
    bad_args = (["--prompt-lens", "16,x"], ["--prompt-lens", "0"], ["--repeats", "0"])
    for bad in (*bad_args, ["--load-modes", "eager"]):
        with pytest.raises(SystemExit):
            ttft.parse_args(bad)


def test_the_gpu_suite_runs_its_parts_on_the_cpu_into_one_results_file(tmp_path: Path) -> None:
    argv = ["--device", "cpu", "--model", "tiny", "--parts", "offload,ttft", "--out", str(tmp_path)]
    argv += ["--prompt-lens", "32", "--blocks", "8,16", "--decode-tokens", "2"]
    assert gpu_suite.main(argv) == 0
    reports = json.loads((tmp_path / "results.json").read_text())["reports"]
    # per size: consecutive and scattered CPU ids x store, load, store+load
    assert [r["blocks"] for r in reports["offload"]["rows"]] == [8] * 6 + [16] * 6
    assert all(r["check"] == "PASS" for r in reports["offload"]["rows"])
    assert reports["ttft"]["rows"][0]["same_token"]
    assert (tmp_path / "offload.png").is_file() and (tmp_path / "ttft.png").is_file()


def test_a_part_that_fails_is_reported_and_the_others_still_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(args: object) -> object:
        raise RuntimeError("no GPU here")

    monkeypatch.setitem(gpu_suite.RUNNERS, "offload", broken)
    argv = ["--device", "cpu", "--model", "tiny", "--parts", "offload,ttft", "--out", str(tmp_path)]
    assert gpu_suite.main([*argv, "--prompt-lens", "16", "--decode-tokens", "0"]) == 1
    reports = json.loads((tmp_path / "results.json").read_text())["reports"]
    assert "RuntimeError: no GPU here" in reports["offload"]["notes"][0]
    assert reports["ttft"]["rows"]
