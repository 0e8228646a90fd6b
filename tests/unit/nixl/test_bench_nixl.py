"""`kvbridge bench nixl`: its arguments, and one real run at tiny size."""

from __future__ import annotations

import pytest

from kvbridge.bench import nixl
from kvbridge.bench.harness import paired_ratio
from kvbridge.bench.nixl import Case
from support.nixl_marks import needs_nixl


def test_block_kib_must_be_a_multiple_of_one_kib_head() -> None:
    assert nixl._parse(["--block-kib", "1"]).block_kib == 1
    with pytest.raises(SystemExit):
        nixl._parse(["--block-kib", "0"])


@pytest.mark.integration
@pytest.mark.timeout(60)
@needs_nixl
def test_a_tiny_run_reads_the_producers_bytes_both_ways_in_the_connectors_descriptors() -> None:
    layers, blocks, iters = 2, 4, 3
    args = nixl._parse(["--layers", "2", "--blocks", "4", "--block-kib", "1", "--iters", "3"])
    result = nixl.run(args)
    assert result.ok, result.notes
    assert f"released by done notifications: {4 * (iters + 1)}/{4 * (iters + 1)}" in result.notes
    assert "raw reader released every NIXL handle" in result.notes
    cases = [Case(p, m) for m in (True, False) for p in ("contiguous", "fragmented")]
    assert [row.case for row in result.rows] == cases
    for row in result.rows:
        r = row.result
        assert r.correct, row.case
        assert row.nbytes == layers * blocks * 1024
        assert len(r.seconds) == len(r.raw_seconds) == iters
        assert min(r.seconds) > 0 and min(r.raw_seconds) > 0
        assert paired_ratio(r.seconds, r.raw_seconds) > 0
        assert 0 <= r.by_board <= iters + 1  # loads landed on the producer's lease board
        assert r.num_descs == (layers if row.case == Case("contiguous", True) else layers * blocks)
        if row.case.merge:
            assert r.raw_descs == r.num_descs
    report = nixl.report(args, result)
    table = report.markdown().splitlines()
    assert sum(line.startswith(("| contiguous", "| fragmented")) for line in table) == 4
    assert report.notes[0].startswith("bytes read (connector and raw) equal the producer's: PASS")
    assert [(r["pattern"], r["merge"]) for r in report.data] == cases


@pytest.mark.integration
@pytest.mark.timeout(60)
@needs_nixl
def test_the_profile_times_each_part_of_a_load_and_releases_everything() -> None:
    """``--profile-loads``: the parts of a load (its READs on the READ agent, its "done" on
    the notification agent), every hold released by a "done", nothing leaked."""
    from kvbridge.bench.nixl_profile import profile

    args = nixl._parse(
        ["--layers", "2", "--blocks", "4", "--block-kib", "1", "--profile-loads", "5"]
    )
    report = profile(args)
    parts = {row["part"]: row for row in report.data if "part" in row}
    assert parts["data READ: post"]["calls"] == 5 and parts["plan (PlanCache.plan)"]["calls"] == 5
    assert parts["notification (send_notif)"]["calls"] >= 5  # the "done"s (and heartbeats)
    zero = "LiveCounts(xfer_handles=0, dlist_handles=0, registered_regions=0, remote_agents=0)"
    assert "released by done notifications: 6/6" in report.notes[-1]
    assert report.notes[-1].count(zero) == 2, report.notes[-1]
