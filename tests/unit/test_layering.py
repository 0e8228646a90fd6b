"""The package's layering rules, one parametrised case each, checked on the source's AST.

- The contract (``kvbridge.config``, ``kvbridge.connector``) imports nothing else of kvbridge:
  no connector, no copy engine, no engine.
- A connector (every package the registry names, e.g. ``nixl``, ``offload``) imports only the
  contract, ``kvbridge.copy`` and itself: no engine, no other connector.
- ``kvbridge.copy`` imports nothing else of kvbridge; the engine kit only the contract.
- The engine imports no serving layer (``serve``, ``vllm``, ``demo``, ``bench``, ``cli``).
- A scheduler half (each connector's ``scheduler``, MultiConnector's ``multi_scheduler``, the
  registered facades the factory imports) imports no torch at run time, itself or through
  what it imports; a subprocess also builds MultiConnector(NIXL, CPU offload)'s scheduler
  half with torch blocked.
- The engine kit imports no torch at run time, itself or through what it imports; a subprocess
  imports every kit module with torch blocked.

Type-only imports (under ``if TYPE_CHECKING:``) count for the package rules but not for torch.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import pytest

from kvbridge.connector.factory import _REGISTRY

SRC = Path(__file__).resolve().parents[2] / "src"
CONTRACT = ("kvbridge.config", "kvbridge.connector")
COPY = "kvbridge.copy"
KIT = "kvbridge.kit"
SERVING = ("kvbridge.serve", "kvbridge.vllm", "kvbridge.demo", "kvbridge.bench", "kvbridge.cli")


class Import(NamedTuple):
    target: str  # module, or module.name for ``from module import name``
    line: int
    type_only: bool  # under ``if TYPE_CHECKING:``
    lazy: bool  # inside a function


def imports(source: str, module: str, *, is_package: bool = False) -> list[Import]:
    """Every import in ``source`` (the code of ``module``), relative ones made absolute."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, type_only: bool, lazy: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(a.name, node.lineno, type_only, lazy) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            found.extend(
                Import(f"{base}.{a.name}", node.lineno, type_only, lazy) for a in node.names
            )
        for child in ast.iter_child_nodes(node):
            visit(
                child,
                type_only or (isinstance(node, ast.If) and child in node.body and _is_tc(node)),
                lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)),
            )

    visit(ast.parse(source), False, False)
    return found


def _is_tc(node: ast.If) -> bool:
    test = node.test
    name = test.attr if isinstance(test, ast.Attribute) else getattr(test, "id", None)
    return name == "TYPE_CHECKING"


def within(name: str, packages: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def modules(root: Path = SRC) -> dict[str, Path]:
    """module name -> file, for every module under ``root`` (a ``src`` folder)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def source_imports(name: str, files: dict[str, Path]) -> list[Import]:
    path = files[name]
    return imports(path.read_text(), name, is_package=path.name == "__init__.py")


class Rule(NamedTuple):
    name: str
    scope: tuple[str, ...]  # the packages the rule applies to
    allowed: tuple[str, ...] | None  # kvbridge imports allowed (None: all but ``forbidden``)
    forbidden: tuple[str, ...] = ()


def violations(rule: Rule, files: dict[str, Path]) -> list[str]:
    """``module:line imports target`` for each kvbridge import that breaks ``rule``."""
    found = []
    for name in files:
        if not within(name, rule.scope):
            continue
        for imp in source_imports(name, files):
            if not within(imp.target, ("kvbridge",)):
                continue
            bad = within(imp.target, rule.forbidden) or (
                rule.allowed is not None and not within(imp.target, rule.allowed)
            )
            if bad:
                found.append(f"{name}:{imp.line} imports {imp.target}")
    return found


def torch_imports(roots: Iterable[str], files: dict[str, Path]) -> list[str]:
    """Run-time torch imports of ``roots`` (lazy ones included) and of the kvbridge modules
    they import at module level, transitively; each as ``module:line imports torch (via ...)``.
    """
    found, seen = [], set()
    todo: list[tuple[str, tuple[str, ...]]] = [(r, (r,)) for r in roots]
    while todo:
        name, path = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for imp in source_imports(name, files):
            if imp.type_only or (imp.lazy and name not in roots):
                continue
            if within(imp.target, ("torch",)):
                found.append(f"{name}:{imp.line} imports {imp.target} (via {' -> '.join(path)})")
            if not imp.lazy:  # a root's lazy imports run in its process, but not on import
                todo.extend((dep, (*path, dep)) for dep in _kvbridge_modules(imp.target, files))
    return sorted(found)


def _kvbridge_modules(target: str, files: dict[str, Path]) -> list[str]:
    """The modules importing ``target`` executes: its packages' ``__init__`` and the module."""
    parts = target.split(".")
    return [m for i in range(1, len(parts) + 1) if (m := ".".join(parts[:i])) in files]


# -- the rules, over the package -----------------------------------------------------------------
CONNECTORS = tuple(
    sorted({t.split(":")[0].rpartition(".")[0] for t in _REGISTRY.values()} - set(CONTRACT))
)
SCHEDULER_HALVES = (
    "kvbridge.connector.factory",
    "kvbridge.connector.multi_scheduler",
    *(t.split(":")[0] for t in _REGISTRY.values()),
    *(f"{c}.scheduler" for c in CONNECTORS),
)
RULES = [
    Rule("contract imports only the contract", CONTRACT, allowed=CONTRACT),
    Rule("copy engine imports only itself", (COPY,), allowed=(COPY,)),
    *(
        Rule(f"{c} imports only the contract, copy and itself", (c,), (*CONTRACT, COPY, c))
        for c in CONNECTORS
    ),
    Rule("engine kit imports only the contract and itself", (KIT,), allowed=(*CONTRACT, KIT)),
    Rule("engine imports no serving layer", ("kvbridge.engine",), None, SERVING),
]


def test_the_registry_names_the_connector_packages() -> None:
    assert {"kvbridge.nixl", "kvbridge.offload"} <= set(CONNECTORS)


@pytest.mark.parametrize("rule", RULES, ids=[r.name for r in RULES])
def test_layering_rule(rule: Rule) -> None:
    files = modules()
    assert any(within(m, rule.scope) for m in files), f"{rule.name}: no module in scope"
    found = violations(rule, files)
    assert not found, f"{rule.name}:\n" + "\n".join(found)


@pytest.mark.parametrize("root", SCHEDULER_HALVES)
def test_scheduler_half_imports_no_torch(root: str) -> None:
    files = modules()
    assert root in files
    found = torch_imports([root], files)
    assert not found, "a scheduler half imports torch:\n" + "\n".join(found)


def test_the_engine_kit_imports_no_torch() -> None:
    files = modules()
    kit = [m for m in files if within(m, (KIT,))]
    assert kit
    found = torch_imports(kit, files)
    assert not found, "the engine kit imports torch:\n" + "\n".join(found)
    code = "import sys\nsys.modules['torch'] = None\n" + "".join(f"import {m}\n" for m in kit)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_multi_connector_scheduler_half_builds_with_torch_blocked() -> None:
    config = {
        "kv_connector": "MultiConnector",
        "kv_connector_extra_config": {
            "connectors": [
                {"kv_connector": "NixlConnector", "kv_connector_extra_config": {}},
                {
                    "kv_connector": "SimpleCPUOffloadConnector",
                    "kv_connector_extra_config": {"num_cpu_blocks": 4},
                },
            ]
        },
    }
    code = textwrap.dedent(
        f"""
        import importlib, sys
        sys.modules["torch"] = None  # any "import torch" now raises ImportError
        from kvbridge.config import TransferConfig
        from kvbridge.connector.base import KVConnectorRole
        from kvbridge.connector.factory import create_connector
        from kvbridge.connector.types import KVCacheSpec
        for name in {list(SCHEDULER_HALVES)!r}:
            importlib.import_module(name)
        cfg = TransferConfig.from_json({json.dumps(config)!r})
        spec = KVCacheSpec(block_size=4, num_blocks=4, num_layers=1, num_kv_heads=1,
                           head_dim=4, dtype="bfloat16")
        half = create_connector(cfg, KVConnectorRole.SCHEDULER, spec)
        print(type(half).__name__, *(type(c).__name__ for c in half.children))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["MultiScheduler", "NixlScheduler", "CPUOffloadScheduler"]


# -- the checker itself, on synthetic modules --------------------------------------------------
def _tree(tmp_path: Path, sources: dict[str, str]) -> dict[str, Path]:
    for name, code in sources.items():
        path = tmp_path.joinpath(*name.split(".")).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(code))
    return modules(tmp_path)


def test_checker_flags_forbidden_imports_of_every_form(tmp_path: Path) -> None:
    files = _tree(
        tmp_path,
        {
            "kvbridge.connector.__init__": "",
            "kvbridge.connector.ok": "from kvbridge.config import TransferConfig\n",
            "kvbridge.connector.bad": """
                from __future__ import annotations
                from typing import TYPE_CHECKING
                import kvbridge.engine.engine
                from kvbridge import nixl
                from ..offload import worker
                if TYPE_CHECKING:
                    from kvbridge.engine.request import Request
                def lazy() -> None:
                    import kvbridge.serve.service
            """,
        },
    )
    rule = Rule("contract", CONTRACT, allowed=CONTRACT)
    assert violations(rule, files) == [
        "kvbridge.connector.bad:4 imports kvbridge.engine.engine",
        "kvbridge.connector.bad:5 imports kvbridge.nixl",
        "kvbridge.connector.bad:6 imports kvbridge.offload.worker",
        "kvbridge.connector.bad:8 imports kvbridge.engine.request.Request",
        "kvbridge.connector.bad:10 imports kvbridge.serve.service",
    ]
    forbid = Rule("engine", ("kvbridge.connector",), None, ("kvbridge.engine",))
    assert len(violations(forbid, files)) == 2


def test_checker_follows_module_level_imports_to_torch(tmp_path: Path) -> None:
    files = _tree(
        tmp_path,
        {
            "kvbridge.__init__": "",
            "kvbridge.x.__init__": "",
            "kvbridge.x.scheduler": """
                from typing import TYPE_CHECKING
                from kvbridge.x import helpers
                if TYPE_CHECKING:
                    import torch
                def build() -> None:
                    from kvbridge.x import worker
            """,
            "kvbridge.x.helpers": "from kvbridge.x.tensors import pack\n",
            "kvbridge.x.tensors": "import torch.nn\n",
            "kvbridge.x.worker": "import torch\n",
        },
    )
    assert torch_imports(["kvbridge.x.scheduler"], files) == [
        "kvbridge.x.tensors:1 imports torch.nn (via kvbridge.x.scheduler -> kvbridge.x.helpers "
        "-> kvbridge.x.tensors)"
    ]
    # a lazy import in the scheduler half itself runs in the scheduler process: it counts
    (tmp_path / "kvbridge/x/helpers.py").write_text("def f() -> None:\n    import torch\n")
    (tmp_path / "kvbridge/x/scheduler.py").write_text("def f() -> None:\n    import torch\n")
    assert torch_imports(["kvbridge.x.scheduler"], files) == [
        "kvbridge.x.scheduler:2 imports torch (via kvbridge.x.scheduler)"
    ]
