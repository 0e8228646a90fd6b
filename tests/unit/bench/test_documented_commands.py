"""Every benchmark command the README and docs show names a benchmark that exists and takes the
arguments shown; one development benchmark runs as documented, from the repository root."""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from kvbridge import cli

REPO = Path(__file__).resolve().parents[3]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# `kvbridge bench NAME ...`, `python -m kvbridge.cli bench NAME ...`, `python -m benchmarks.NAME
# ...`, `python benchmarks/NAME.py ...`; NAME may list alternatives (offload|nixl).
COMMAND = re.compile(
    r"(?:kvbridge(?:\.cli)? bench (?P<bench>[\w|-]+)|-m benchmarks\.(?P<mod>\w+)"
    r"|benchmarks/(?P<script>\w+)\.py)(?P<args>.*)"
)


def documented() -> list[tuple[str, str, list[str]]]:
    """(where, module, argv) of every command in a code span of the docs."""
    out = []
    for doc in DOCS:
        for span in re.findall(r"`([^`]+)`", doc.read_text()):
            m = COMMAND.search(" ".join(span.split()))
            if m is None:
                continue
            where = f"{doc.name}: {' '.join(span.split())}"
            argv = shlex.split(m["args"])
            if m["bench"]:
                names = [n for n in m["bench"].split("|") if n != "NAME"]
                out += [(where, cli.BENCHMARKS.get(n, f"missing bench {n}"), argv) for n in names]
            elif (m["mod"] or m["script"]) != "NAME":
                out.append((where, f"benchmarks.{m['mod'] or m['script']}", argv))
    return out


COMMANDS = documented()


def test_the_docs_show_the_link_checks_and_the_development_benchmarks() -> None:
    modules = {module for _, module, _ in COMMANDS}
    assert {"kvbridge.bench.nixl", "benchmarks.nixl_modes", "benchmarks.pd_gpu"} <= modules
    assert {"benchmarks.gpu_suite", "benchmarks.vllm_pd"} <= modules


@pytest.mark.parametrize(("where", "module", "argv"), COMMANDS, ids=[c[0] for c in COMMANDS])
def test_a_documented_command_names_a_benchmark_that_takes_its_arguments(
    where: str, module: str, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Arguments are parsed, and checked against their types and choices, up to ``--help``."""
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0, capsys.readouterr().err
    assert "usage:" in capsys.readouterr().out


def test_a_development_benchmark_runs_as_documented_from_the_repository_root() -> None:
    argv = ["--prompt-lens", "16", "--repeats", "1", "--block-size", "4", "--markdown"]
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.ttft", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| prompt tokens | KV GiB |" in run.stdout
