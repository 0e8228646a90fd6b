"""Every ``check_integrity`` raises one type, ``kvbridge.connector.types.IntegrityError``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from kvbridge.connector.types import IntegrityError
from kvbridge.nixl.leases import LeaseTable
from kvbridge.offload.pool import CPUBlockPool

SRC = Path(__file__).resolve().parents[3] / "src"


def raised_types(source: str) -> list[tuple[int, str]]:
    """``(line, exception name)`` of each ``raise`` inside any ``check_integrity`` of
    ``source`` (nested helpers included)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name == "check_integrity":
            for inner in ast.walk(node):
                if isinstance(inner, ast.Raise) and inner.exc is not None:
                    exc = inner.exc.func if isinstance(inner.exc, ast.Call) else inner.exc
                    found.append((inner.lineno, ast.unparse(exc)))
    return sorted(found)


def test_every_check_integrity_in_the_package_raises_integrity_error() -> None:
    wrong = [
        f"{path.relative_to(SRC)}:{line} raises {name}"
        for path in sorted(SRC.rglob("*.py"))
        for line, name in raised_types(path.read_text())
        if name != "IntegrityError"
    ]
    assert not wrong, "\n".join(wrong)
    assert issubclass(IntegrityError, AssertionError)


def test_the_checker_sees_raises_in_nested_helpers() -> None:
    code = (
        "def check_integrity():\n"
        "    def claim():\n"
        "        raise RuntimeError('x')\n"
        "    raise IntegrityError('y')\n"
    )
    assert raised_types(code) == [(3, "RuntimeError"), (4, "IntegrityError")]


def test_pool_and_lease_table_raise_integrity_error() -> None:
    pool = CPUBlockPool(3, block_size=4)
    pool._free.pop()  # a block in no state
    with pytest.raises(
        IntegrityError, match=r"CPUBlockPool integrity: block 2 is in no state \(leaked\)"
    ):
        pool.check_integrity()
    table = LeaseTable(history_size=1)
    table._completed.add("r")
    table._expired.add("r")
    with pytest.raises(IntegrityError, match="LeaseTable: a request is in two states"):
        table.check_integrity()
