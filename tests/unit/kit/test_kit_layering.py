"""The kit sits on the contract: it imports only ``kvbridge.config``, ``kvbridge.connector``
and itself (no connector package, no engine), and never torch at run time."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import kvbridge.kit

KIT = Path(kvbridge.kit.__file__).parent
ALLOWED = ("kvbridge.config", "kvbridge.connector", "kvbridge.kit")


def _imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, module, type_only) of every absolute import in ``path``."""
    found = []
    tree = ast.parse(path.read_text())
    type_only = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
        for n in ast.walk(node)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.lineno, node.module, id(node) in type_only))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, a.name, id(node) in type_only) for a in node.names)
    return found


def test_the_kit_imports_only_the_contract_and_itself() -> None:
    bad = [
        f"{path.name}:{line} imports {module}"
        for path in sorted(KIT.glob("*.py"))
        for line, module, _ in _imports(path)
        if module.startswith("kvbridge")
        and not any(module == a or module.startswith(a + ".") for a in ALLOWED)
    ]
    assert not bad, "\n".join(bad)


def test_the_kit_needs_no_torch() -> None:
    assert [m for p in KIT.glob("*.py") for _, m, t in _imports(p) if m == "torch" and not t] == []
    names = sorted(p.stem for p in KIT.glob("*.py") if p.stem != "__init__")
    modules = ", ".join(f"kvbridge.kit.{name}" for name in names)
    code = f"import sys\nsys.modules['torch'] = None\nimport {modules}\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
