"""``import kvbridge``: what an embedder needs, imported lazily, never torch."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import kvbridge

INIT = Path(kvbridge.__file__)


def test_import_kvbridge_is_light_and_every_name_resolves_without_torch() -> None:
    code = (
        "import json, sys\n"
        "sys.modules['torch'] = None  # any `import torch` now raises\n"
        "import kvbridge\n"
        "eager = sorted(m for m in sys.modules if m.startswith('kvbridge.'))\n"
        "missing = [n for n in kvbridge.__all__ if getattr(kvbridge, n, None) is None]\n"
        "print(json.dumps({'eager': eager, 'missing': missing}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert got["eager"] == ["kvbridge.config"]  # the rest waits for first use
    assert got["missing"] == []


@pytest.mark.parametrize("name", sorted(kvbridge._LAZY))
def test_each_lazy_name_is_its_modules_object(name: str) -> None:
    module = importlib.import_module(kvbridge._LAZY[name])
    assert getattr(kvbridge, name) is getattr(module, name)
    assert name in dir(kvbridge) and name in kvbridge.__all__


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        kvbridge.Nope  # type: ignore[attr-defined]  # noqa: B018


def test_the_type_checking_imports_match_the_lazy_table() -> None:
    """Type checkers see what ``__getattr__`` serves: the same names, from the same modules."""
    tree = ast.parse(INIT.read_text())
    typed: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom) and imp.module is not None
                typed.update({a.name: imp.module for a in imp.names})
    assert typed == kvbridge._LAZY
