"""The README's embedding example: it is examples/embed/cpu_tier.py, it runs, and it uses only
names ``import kvbridge`` exposes."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import kvbridge

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "embed" / "cpu_tier.py"


def _readme_section() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Embed kvbridge in your engine")
    end = readme.index("\n## ", start + 1)
    return readme[start:end]


def test_the_readme_shows_the_example_file_verbatim() -> None:
    blocks = re.findall(r"```python\n(.*?)```", _readme_section(), flags=re.S)
    assert blocks == [EXAMPLE.read_text()]


def test_the_example_runs_and_reloads_the_prompt_from_the_cpu_tier() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    first, again = result.stdout.splitlines()
    assert first.endswith("(CPU tier: 0 tokens)") and again.endswith("(CPU tier: 12 tokens)")
    assert first.split(" (")[0].removeprefix("first: ") == again.split(" (")[0].removeprefix(
        "again: "
    )


def test_the_example_uses_only_names_import_kvbridge_exposes() -> None:
    tree = ast.parse(EXAMPLE.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported.add(f"from {node.module}")
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    assert imported == {"kvbridge", "torch"}
    used = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "kvbridge"
    }
    assert used and used <= set(kvbridge.__all__)
