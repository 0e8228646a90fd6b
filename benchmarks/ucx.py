"""The UCX lanes behind a transfer, read from the tables UCX prints with ``UCX_PROTO_INFO=y``.

A VRAM path can silently fall back to ``tcp``; the benches that move KV between processes set
``UCX_PROTO_INFO=y`` on the reader and report the lanes its READs used.
"""

from __future__ import annotations

import re
from typing import NamedTuple


class UcxLanes(NamedTuple):
    """UCX protocol choices seen by the reader: lanes per operation, and every table parsed."""

    read: tuple[str, ...]
    write: tuple[str, ...]
    tables: dict[str, list[tuple[str, str, str]]]  # title -> (size range, protocol, lanes)


_LOG_PREFIX = re.compile(r"^\[[^\]]*\]\s*\[[^\]]*\]\s*")


def parse_ucx_proto_info(text: str) -> UcxLanes:
    """Parse the protocol tables UCX prints with ``UCX_PROTO_INFO=y``."""
    tables: dict[str, list[tuple[str, str, str]]] = {}
    title: list[str] = []
    current: str | None = None
    last = ""
    for line in text.splitlines():
        body = _LOG_PREFIX.sub("", line).strip()
        if not body.startswith("|"):
            continue
        cells = [cell.strip() for cell in body.strip("|").split("|")]
        if len(cells) == 1:
            title = title if last == "title" else []
            title.append(cells[0])
            last = "title"
        elif cells == ["Range", "Description", "Config"]:
            current = " / ".join(title)
            tables.setdefault(current, [])
            last = "header"
        elif len(cells) == 3 and current is not None:
            tables[current].append((cells[0], cells[1], cells[2]))
            last = "row"

    def lanes(op: str) -> tuple[str, ...]:
        found = {row[2] for name, rows in tables.items() if op in name for row in rows}
        return tuple(sorted(found))

    return UcxLanes(lanes("remote memory read"), lanes("remote memory write"), tables)


def read_lanes(log_path: str) -> list[str]:
    """The lanes UCX used for READs, from a process's log."""
    with open(log_path, errors="replace") as f:
        return list(parse_ucx_proto_info(f.read()).read)
