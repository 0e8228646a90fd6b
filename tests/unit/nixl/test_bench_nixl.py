"""`kvbridge bench nixl`: the paired statistic, ABBA order, and one real run at tiny size."""

from __future__ import annotations

import pytest

from kvbridge.bench import nixl
from kvbridge.bench.nixl import Case, paired_ratio, raw_first
from support.nixl_marks import needs_nixl


def test_paired_ratio_is_the_median_of_raw_over_connector_per_pair() -> None:
    connector = [1.0, 2.0, 4.0]
    raw = [0.5, 4.0, 4.0]  # ratios 0.5, 2.0, 1.0
    assert paired_ratio(connector, raw) == 1.0
    assert paired_ratio([2.0, 1.0], [1.0, 2.0]) == pytest.approx((0.5 + 2.0) / 2)


def test_paired_ratio_ignores_drift_that_hits_both_sides_of_a_pair() -> None:
    """A slow phase of the machine slows both reads of its pairs: the ratio does not move."""
    connector = [1.0, 1.0, 10.0, 10.0, 1.0]
    raw = [0.8 * c for c in connector]
    assert paired_ratio(connector, raw) == pytest.approx(0.8)


@pytest.mark.parametrize(("connector", "raw"), [([1.0], [1.0, 2.0]), ([], [])])
def test_paired_ratio_needs_one_raw_time_per_connector_time(
    connector: list[float], raw: list[float]
) -> None:
    with pytest.raises(ValueError, match="as many raw as connector"):
        paired_ratio(connector, raw)


def test_abba_alternates_which_read_goes_first() -> None:
    order = [raw_first(i) for i in range(6)]
    assert order == [False, True, False, True, False, True]
    assert sum(order) == len(order) // 2  # each side goes first in half of the pairs


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
        assert r.num_descs == (layers if row.case == Case("contiguous", True) else layers * blocks)
        if row.case.merge:
            assert r.raw_descs == r.num_descs
    table = nixl._markdown(args, result).splitlines()
    assert (
        sum(line.startswith("| contiguous") or line.startswith("| fragmented") for line in table)
        == 4
    )
    assert table[-1].startswith("bytes read (connector and raw) equal the producer's: PASS")
