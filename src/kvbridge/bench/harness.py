"""What every benchmark shares: arguments, same-run baselines, reports and peer processes.

Used by the link checks of ``kvbridge bench`` (this package) and by the development benchmarks
in the repository's ``benchmarks/``:

- ``parser`` gives every bench the same output options (``--markdown``, ``--json PATH``);
  ``positive``, ``int_list`` and ``subset`` check the rest.
- ``abba`` runs a measurement and its baseline in alternating order, so drift of the machine
  hits both; ``paired_ratio`` is the ratio that drift does not move.
- ``Report`` is one table with notes under it and its rows as data; ``emit`` prints reports as
  rich tables or markdown (``show``) and writes them all as JSON (``save``).
- ``spawn``, ``expect``, ``reap``, ``child_env``, ``enter_child`` and ``log_tails`` run peer
  processes that talk ``(kind, payload)`` messages over pipes.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.table import Table

A = TypeVar("A")
B = TypeVar("B")

# -- arguments -------------------------------------------------------------------------------------


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with the output options every bench takes."""
    p = argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    out = p.add_argument_group("output")
    out.add_argument("--markdown", action="store_true", help="print markdown tables, not rich")
    out.add_argument("--json", metavar="PATH", type=Path, help="also write the results as JSON")
    return p


def positive(p: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """Exit with a usage error naming the first of ``names`` (dest names) below 1."""
    for name in names:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")


def int_list(text: str) -> list[int]:
    """An argparse type: comma-separated integers (``2048,8192``)."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def subset(known: Iterable[str]) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated subset of ``known``, in the order given."""
    names = tuple(known)

    def parse(text: str) -> list[str]:
        picked = text.split(",")
        unknown = [name for name in picked if name not in names]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown[0]!r} (known: {', '.join(names)})")
        return picked

    return parse


# -- same-run baselines ----------------------------------------------------------------------------


def timed(fn: Callable[[], object], sync: Callable[[], object] = lambda: None) -> float:
    """Seconds ``fn`` took, with ``sync`` (a device synchronize) before and after."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def baseline_first(i: int) -> bool:
    """A B B A: pair ``i`` starts with the baseline when ``i`` is odd."""
    return i % 2 == 1


def abba(
    measured: Callable[[], A], baseline: Callable[[], B], iters: int
) -> tuple[list[A], list[B]]:
    """``iters`` pairs of one ``measured`` and one ``baseline`` run, each side first in half of
    them (``baseline_first``), so both see the same machine; their results, pair by pair."""
    mine: list[A] = []
    theirs: list[B] = []
    for i in range(iters):
        if baseline_first(i):
            theirs.append(baseline())
            mine.append(measured())
        else:
            mine.append(measured())
            theirs.append(baseline())
    return mine, theirs


def paired_ratio(measured: Sequence[float], baseline: Sequence[float]) -> float:
    """Median of ``baseline[i] / measured[i]`` (seconds): the measured speed over the
    baseline's, pair by pair, so a slow phase of the machine that hits a pair cancels out."""
    if len(measured) != len(baseline) or not measured:
        raise ValueError(
            f"need one baseline time per measured time, got {len(baseline)}/{len(measured)}"
        )
    return statistics.median(b / m for m, b in zip(measured, baseline))


# -- reports ---------------------------------------------------------------------------------------


@dataclass
class Report:
    """One table: ``cells`` to read, ``data`` (the same rows as numbers) for ``--json``, and
    ``notes`` printed under it (verdicts, failures, where logs were kept)."""

    name: str  # key in the JSON output
    title: str
    columns: Sequence[str]
    words: Sequence[str] = ()  # columns of words, aligned left like the first; numbers right
    cells: list[list[str]] = field(default_factory=list)
    data: list[Any] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    samples: Any = None  # JSON-able raw measurements the rows summarise, saved with them

    def add(self, cells: Sequence[str], data: Any = None) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{self.name}: {len(cells)} cells for {len(self.columns)} columns")
        self.cells.append(list(cells))
        if data is not None:
            self.data.append(data)

    def table(self) -> Table:
        table = Table(title=self.title)
        for i, col in enumerate(self.columns):
            table.add_column(col, justify="left" if i == 0 or col in self.words else "right")
        for row in self.cells:
            table.add_row(*row)
        return table

    def markdown(self) -> str:
        head = ["| " + " | ".join(self.columns) + " |", "|---" * len(self.columns) + "|"]
        body = ["| " + " | ".join(row) + " |" for row in self.cells]
        return "\n".join([self.title, "", *head, *body])

    def as_json(self) -> dict[str, Any]:
        out = {"title": self.title, "rows": self.data, "notes": self.notes}
        return out if self.samples is None else {**out, "samples": self.samples}


def console() -> Console:
    """A console that does not squeeze wide tables when the output is not a terminal."""
    out = Console()
    return out if out.is_terminal else Console(width=220)


def show(reports: Sequence[Report], *, markdown: bool = False, out: Console | None = None) -> None:
    """Print each report (as markdown, or a rich table) and its notes."""
    out = out or console()
    for report in reports:
        if markdown:
            out.print(report.markdown(), markup=False, soft_wrap=True)
        else:
            out.print(report.table())
        for note in report.notes:
            out.print(note, markup=False, soft_wrap=True)


def save(reports: Sequence[Report], args: argparse.Namespace, path: Path) -> None:
    """Write the arguments and every report's data and notes to ``path`` as JSON."""
    doc = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "args": vars(args),
        "reports": {r.name: r.as_json() for r in reports},
    }
    Path(path).write_text(json.dumps(doc, indent=1, default=str))


def emit(reports: Sequence[Report], args: argparse.Namespace, out: Console | None = None) -> None:
    """``show`` the reports as the output options say (``--markdown``), and ``save`` them to
    ``--json PATH`` if given."""
    show(reports, markdown=getattr(args, "markdown", False), out=out)
    path = getattr(args, "json", None)
    if path is not None:
        save(reports, args, path)


# -- peer processes --------------------------------------------------------------------------------

# NVLink multicast stays off in every child (it can take a shared host's GPUs out of service).
NVLINK_MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def child_env(device: str, gpu: int | None) -> dict[str, str]:
    """Variables every benchmark child gets on top of this process's environment."""
    env = {"PYTHONUNBUFFERED": "1", **NVLINK_MULTICAST_OFF}
    if device == "cuda" and gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return env


def spawn(target: Callable[..., object], *args: Any) -> BaseProcess:
    """Start ``target(*args)`` in a fresh interpreter (spawn: no inherited NIXL or CUDA state)."""
    proc = mp.get_context("spawn").Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def enter_child(env: dict[str, str], log_path: str, level: str) -> None:
    """A spawned child's first step, before torch or NIXL start: its environment, its stdout
    and stderr (and so UCX's output) into ``log_path``, logging at ``level``."""
    os.environ.update(env)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def expect(conn: Connection, kind: str, timeout_s: float) -> Any:
    """The payload of the next ``(kind, payload)`` message; ``TimeoutError`` after
    ``timeout_s``, ``RuntimeError`` naming what came instead, ``EOFError`` if the peer is gone."""
    if not conn.poll(timeout_s):
        raise TimeoutError(f"no {kind!r} from the peer within {timeout_s:g}s")
    got, payload = conn.recv()
    if got != kind:
        raise RuntimeError(f"the peer sent {got!r}, expected {kind!r}: {payload}")
    return payload


def reap(procs: Iterable[BaseProcess], grace_s: float) -> None:
    """Give each process ``grace_s`` to exit, then kill it."""
    for proc in procs:
        proc.join(grace_s)
        if proc.is_alive():
            proc.kill()
            proc.join(5)


def log_tails(paths: Iterable[str | Path], lines: int = 12) -> str:
    """The last ``lines`` of each log, for an error message."""
    out = []
    for path in paths:
        try:
            tail = Path(path).read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            tail = ["(no log)"]
        out.append(f"\n--- {path}:\n" + "\n".join(tail))
    return "".join(out)
