"""parse_ucx_proto_info: the UCX lanes behind a transfer, read from ``UCX_PROTO_INFO=y`` output."""

from __future__ import annotations

from benchmarks.ucx import parse_ucx_proto_info

SAMPLE = """\
[1795624798.95] [vm:5373 :0]   +--------+-------------+-----------------------------------+
[1795624798.95] [vm:5373 :0]   | B intra-node cfg#1                                       |
[1795624798.95] [vm:5373 :0]   | remote memory read by ucp_get*(multi) into host memory from host |
[1795624798.95] [vm:5373 :0]   +--------+-------------+-----------------------------------+
[1795624798.95] [vm:5373 :0]   | Range  | Description |              Config               |
[1795624798.95] [vm:5373 :0]   +--------+-------------+-----------------------------------+
[1795624798.95] [vm:5373 :0]   | 0..inf | zero-copy   | cma/memory                        |
[1795624798.95] [vm:5373 :0]   +--------+-------------+-----------------------------------+
2026-11-25 16:37:42 NIXL INFO    _api.py:405 Backend UCX was instantiated
[1795624798.96] [vm:5373 :0]   +------------+--------------------+---------------+
[1795624798.96] [vm:5373 :0]   | B self cfg#0                                    |
[1795624798.96] [vm:5373 :0]   | remote memory write by ucp_put* from host memory to host |
[1795624798.96] [vm:5373 :0]   +------------+--------------------+---------------+
[1795624798.96] [vm:5373 :0]   |   Range    |    Description     |    Config     |
[1795624798.96] [vm:5373 :0]   +------------+--------------------+---------------+
[1795624798.96] [vm:5373 :0]   |          0 | short              | tcp/lo        |
[1795624798.96] [vm:5373 :0]   | 1..inf     | zero-copy          | rma_am(tcp/lo) |
[1795624798.96] [vm:5373 :0]   +------------+--------------------+---------------+
"""


def test_parses_tables_and_lanes_per_operation() -> None:
    lanes = parse_ucx_proto_info(SAMPLE)
    assert lanes.read == ("cma/memory",)
    assert lanes.write == ("rma_am(tcp/lo)", "tcp/lo")
    read_title = (
        "B intra-node cfg#1 / remote memory read by ucp_get*(multi) into host memory from host"
    )
    assert lanes.tables[read_title] == [("0..inf", "zero-copy", "cma/memory")]
    assert len(lanes.tables) == 2


def test_no_tables_means_no_lanes() -> None:
    lanes = parse_ucx_proto_info("UCX  WARN  nothing to see\n| stray | row | here |\n")
    assert lanes.read == lanes.write == ()
    assert lanes.tables == {}
