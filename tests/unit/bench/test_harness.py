"""The benchmarks' shared harness: arguments, A B B A pairs, reports, peer processes."""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
from rich.console import Console

from kvbridge.bench import harness


def test_every_parser_takes_the_output_options_and_checks_counts() -> None:
    p = harness.parser("bench x", "doc")
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--lens", type=harness.int_list, default=[1])
    p.add_argument("--modes", type=harness.subset(("a", "b")), default=["a"])
    args = p.parse_args(["--markdown", "--json", "out.json", "--lens", "2,8", "--modes", "b,a"])
    assert (args.markdown, args.json, args.lens, args.modes) == (
        True,
        Path("out.json"),
        [2, 8],
        ["b", "a"],
    )
    for bad in (["--lens", "2,x"], ["--modes", "a,c"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)
    with pytest.raises(SystemExit):
        harness.positive(p, p.parse_args(["--iters", "0"]), "iters")


def test_abba_alternates_which_side_goes_first() -> None:
    order: list[str] = []
    mine, theirs = harness.abba(
        lambda: order.append("m") or len(order), lambda: order.append("b") or -len(order), 4
    )
    assert "".join(order) == "mbbmmbbm"
    assert (mine, theirs) == ([1, 4, 5, 8], [-2, -3, -6, -7])  # paired by index
    assert [harness.baseline_first(i) for i in range(4)] == [False, True, False, True]


def test_paired_ratio_is_the_median_of_baseline_over_measured_per_pair() -> None:
    assert harness.paired_ratio([1.0, 2.0, 4.0], [0.5, 4.0, 4.0]) == 1.0  # 0.5, 2, 1
    assert harness.paired_ratio([2.0, 1.0], [1.0, 2.0]) == pytest.approx((0.5 + 2.0) / 2)


def test_paired_ratio_ignores_drift_that_hits_both_sides_of_a_pair() -> None:
    """A slow phase of the machine slows both runs of its pairs: the ratio does not move."""
    measured = [1.0, 1.0, 10.0, 10.0, 1.0]
    assert harness.paired_ratio(measured, [0.8 * m for m in measured]) == pytest.approx(0.8)


@pytest.mark.parametrize(("measured", "baseline"), [([1.0], [1.0, 2.0]), ([], [])])
def test_paired_ratio_needs_one_baseline_time_per_measured_time(
    measured: list[float], baseline: list[float]
) -> None:
    with pytest.raises(ValueError, match="one baseline time per measured time"):
        harness.paired_ratio(measured, baseline)


def _report() -> harness.Report:
    report = harness.Report("demo", "a title", ("case", "GB/s"))
    report.add(["one", "1.50"], {"case": "one", "gbps": 1.5})
    report.notes.append("verdict: met")
    return report


def test_a_report_prints_as_markdown_or_a_table_and_writes_json(tmp_path: Path) -> None:
    report = _report()
    assert report.markdown().splitlines() == [
        "a title", "", "| case | GB/s |", "|---|---|", "| one | 1.50 |",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="1 cells for 2 columns"):
        report.add(["short"])
    out = Console(width=100, record=True)
    path = tmp_path / "r.json"
    harness.emit([report], argparse.Namespace(markdown=False, json=path, iters=3), out)
    text = out.export_text()
    assert "a title" in text and "1.50" in text and "verdict: met" in text
    doc = json.loads(path.read_text())
    assert doc["args"] == {"markdown": False, "json": str(path), "iters": 3}
    assert doc["reports"]["demo"] == {
        "title": "a title", "rows": [{"case": "one", "gbps": 1.5}], "notes": ["verdict: met"],
    }  # fmt: skip
    harness.emit([report], argparse.Namespace(markdown=True, json=None), out)
    assert "| one | 1.50 |" in out.export_text()


def test_children_keep_nvlink_multicast_off_and_see_one_gpu() -> None:
    env = harness.child_env("cuda", 1)
    assert env["NCCL_NVLS_ENABLE"] == "0"
    assert env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert env["NVSHMEM_DISABLE_NVLS"] == "1"
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    assert "CUDA_VISIBLE_DEVICES" not in harness.child_env("cpu", 1)


def _echo(conn: Connection, log_path: str) -> None:
    harness.enter_child({"KVB_HARNESS_TEST": "yes"}, log_path, "INFO")
    print("child says hi", flush=True)
    kind, payload = conn.recv()
    conn.send((kind, payload))
    conn.send(("failed", "a traceback"))


def test_a_spawned_peer_logs_to_its_file_and_answers_in_kind(tmp_path: Path) -> None:
    ours, theirs = mp.Pipe()
    log = tmp_path / "child.log"
    proc = harness.spawn(_echo, theirs, str(log))
    theirs.close()
    try:
        ours.send(("ping", 7))
        assert harness.expect(ours, "ping", 60) == 7
        with pytest.raises(RuntimeError, match="sent 'failed', expected 'ping': a traceback"):
            harness.expect(ours, "ping", 60)
        with pytest.raises((TimeoutError, EOFError)):
            harness.expect(ours, "ping", 0.01)
    finally:
        harness.reap([proc], 30)
    assert proc.exitcode == 0
    assert "child says hi" in harness.log_tails([log])
    assert "(no log)" in harness.log_tails([tmp_path / "missing.log"])
