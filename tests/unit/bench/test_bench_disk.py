"""``kvbridge bench disk`` runs end to end on a small set, O_DIRECT or buffered, and checks its
read-back byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvbridge.bench import disk


@pytest.mark.parametrize("buffered", [False, True])
def test_bench_disk_runs_and_reports_both_directions(tmp_path: Path, buffered: bool) -> None:
    out = tmp_path / "out.json"
    argv = ["--dir", str(tmp_path), "--blocks", "4", "--layers", "2", "--threads", "1,2"]
    argv += ["--iters", "1", "--json", str(out), *(["--buffered"] if buffered else [])]
    assert disk.main(argv) == 0
    rows = json.loads(out.read_text())["reports"]["disk"]["rows"]
    assert [(r["direction"][:5], r["threads"]) for r in rows] == [
        ("write", 1), ("read ", 1), ("write", 2), ("read ", 2)
    ]  # fmt: skip
    assert all(r["check"] and r["tier_s"] > 0 and r["baseline_s"] > 0 for r in rows)
    assert {r["mode"] for r in rows} <= {"O_DIRECT", "buffered"}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # its directory is removed
