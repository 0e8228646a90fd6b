"""``benchmarks.vllm_pd``'s report from made-up samples (the run itself needs vLLM: tests/vllm)."""

from __future__ import annotations

from typing import Any

from benchmarks import vllm_pd


def _samples(scale: float, texts: list[str], read_mean_s: float | None) -> dict[str, Any]:
    return {
        "ttft_s": [scale * t for t in (0.1, 0.2, 0.3)],
        "p_round_trip_s": [0.05, 0.05, 0.05],
        "d_load_s": [scale * t for t in (0.01, 0.02, 0.03)],
        "cold_ttft_s": [1.0],
        "external_tokens": [383.0, 383.0, 383.0],
        "texts": texts,
        "reads": 3.0,
        "read_mean_s": read_mean_s,
    }


def test_the_stacks_side_by_side_with_ratios_and_the_raw_samples_for_json() -> None:
    results = {
        "vllm": _samples(1.0, ["a", "b", "c"], 0.004),
        "kvbridge": _samples(0.5, ["a", "b", "x"], None),
    }
    report = vllm_pd.report("head", results)
    rows = {cells[0]: cells[1:] for cells in report.cells}
    assert rows["TTFT p50 (ms)"] == ["200.0", "100.0", "0.50x"]
    assert rows["READ mean, own stats (ms)"] == ["4.0", "-", "-"]
    assert report.notes == ["answers identical: 2/3"]
    saved = report.as_json()
    assert saved["samples"] is results
    assert saved["rows"][0] == {"measure": "TTFT p50 (ms)", "vllm": 200.0, "kvbridge": 100.0}
