"""``vllm serve`` processes started from the README's own lines, and the log-probability oracle.

The README's "Use with vLLM" section is the source of truth: its bash blocks are split into
commands (a command ends at a newline outside quotes and continuations), the setup lines
(exports, assignments, the ``vllm`` shell function) are prefixed to each server command, and
only the placeholders the README uses are substituted: the checkpoint path and the ports.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from kvbridge.demo.processes import stop_group

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
SECTION = "## Use with vLLM"
README_MODEL = "/tmp/tiny-llama"  # the checkpoint path the README writes and serves
README_PORTS = {"prefill": 8100, "decode": 8200, "proxy": 8000, "side_channel": 5600}
_SETUP = re.compile(r"^(export |[A-Za-z_]\w*=|[A-Za-z_][\w-]*\(\)\s*\{)")


# -- the README -------------------------------------------------------------------------------
def bash_blocks(markdown: str, section: str = SECTION) -> list[str]:
    """The ```bash blocks of ``section`` (up to the next ``## `` heading)."""
    start = markdown.index(section + "\n")
    end = markdown.find("\n## ", start + len(section))
    body = markdown[start : end if end >= 0 else None]
    return re.findall(r"```bash\n(.*?)```", body, flags=re.S)


def split_commands(script: str) -> list[str]:
    """Logical commands of a bash script: comments dropped, quotes and ``\\`` lines joined."""
    commands: list[str] = []
    current: list[str] = []
    in_quote: str | None = None
    for line in script.splitlines():
        if in_quote is None and not current and not line.strip():
            continue
        kept, i = [], 0
        while i < len(line):
            ch = line[i]
            if in_quote is not None:
                in_quote = None if ch == in_quote else in_quote
            elif ch in "'\"":
                in_quote = ch
            elif ch == "#" and (i == 0 or line[i - 1].isspace()):
                break  # a comment runs to the end of the line
            kept.append(ch)
            i += 1
        text = "".join(kept).rstrip() if in_quote is None else "".join(kept)
        if in_quote is None and text.endswith("\\"):
            current.append(text[:-1].rstrip())
            continue
        current.append(text)
        if in_quote is None:
            command = "\n".join(current).strip()
            if command:
                commands.append(command)
            current = []
    if current:
        raise ValueError(f"unterminated command in the README: {current[0][:60]!r}")
    return commands


@dataclass(frozen=True)
class ReadmeCommands:
    """The README's commands, by kind."""

    setup: tuple[str, ...]  # exports, assignments, shell functions: run before every server
    checkpoint: str  # writes the tiny checkpoint
    servers: tuple[str, ...]  # the ``vllm serve`` lines, in README order
    proxy: str  # ``kvbridge proxy ...``

    def server(self, connector: str, role: str) -> str:
        """The one ``vllm serve`` line loading ``connector`` with ``kv_role`` ``role``."""
        found = [
            s
            for s in self.servers
            if kv_config(s)["kv_connector"] == connector and kv_config(s)["kv_role"] == role
        ]
        if len(found) != 1:
            raise LookupError(f"README: {len(found)} vllm serve lines for {connector} {role}")
        return found[0]


def readme_commands(path: Path = README) -> ReadmeCommands:
    commands = [c for block in bash_blocks(path.read_text()) for c in split_commands(block)]
    setup = tuple(c for c in commands if _SETUP.match(c))
    checkpoint = [c for c in commands if "tiny_checkpoint.py" in c]
    servers = tuple(c for c in commands if c.startswith("vllm serve "))
    proxy = [c for c in commands if c.startswith("kvbridge proxy ")]
    if len(checkpoint) != 1 or len(proxy) != 1 or not servers:
        raise LookupError("README: expected one checkpoint line, vllm serve lines, one proxy line")
    return ReadmeCommands(setup, checkpoint[0], servers, proxy[0])


_KV_JSON = re.compile(r"--kv-transfer-config '([^']*)'")


def kv_config(command: str) -> dict[str, Any]:
    match = _KV_JSON.search(command)
    if match is None:
        raise LookupError(f"no --kv-transfer-config in {command[:60]!r}")
    return json.loads(match.group(1))


def with_kv_config(command: str, config: Mapping[str, Any]) -> str:
    return _KV_JSON.sub(lambda _: f"--kv-transfer-config '{json.dumps(config)}'", command)


def substitute(command: str, values: Mapping[str, str | int]) -> str:
    """Replace the README's placeholders (the model path, whole-number ports) in ``command``."""
    for placeholder, value in values.items():
        command = re.sub(rf"(?<![\w/]){re.escape(placeholder)}(?![\w/])", str(value), command)
    return command


# -- processes --------------------------------------------------------------------------------
_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")
_handed_out: set[int] = set()


def free_port() -> int:
    """A port free now and below the kernel's ephemeral range.

    A server binds its port minutes after this pick. A port from the ephemeral range (what
    ``bind(0)`` hands out) can meanwhile be taken by any outgoing connection or ``bind(0)`` of
    the engines started in between (CI saw the proxy's port taken so); ports below that range
    are only ever taken by explicit binds.
    """
    low = int(_EPHEMERAL.read_text().split()[0]) if _EPHEMERAL.exists() else 32768
    for port in random.sample(range(max(1024, low - 12000), low), 200):
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port below the ephemeral range (starts at {low})")


def bin_env(**extra: str) -> dict[str, str]:
    """The test's environment with this interpreter's bin dir first (python, vllm, kvbridge)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    env.update(extra)
    return env


class Server:
    """One README command run by bash in its own process group; logs to ``log``."""

    def __init__(self, name: str, script: str, log: Path, env: Mapping[str, str]) -> None:
        self.name, self.log = name, log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                ["bash", "-c", script],
                cwd=REPO,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 40) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(line for line in lines[-n:] if "GET /health" not in line)

    def kill(self, timeout_s: float = 15.0, *, crash: bool = False) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after ``timeout_s``; returns
        once the group is gone. ``crash``: SIGKILL at once (no shutdown code runs)."""
        stop_group(self.proc, None if crash else timeout_s, 10.0)

    def pause(self) -> None:
        """Stop the whole group (SIGSTOP): it costs no CPU until ``resume``."""
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)


def wait_ready(servers: Sequence[tuple[Server, str]], deadline_s: float) -> None:
    """Poll each ``(server, url)``'s ``/health`` until 200; fail fast if a server exits."""
    pending = list(servers)
    end = time.monotonic() + deadline_s
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while pending:
            server, url = pending[0]
            if not server.alive:
                raise RuntimeError(f"{server.name} exited before it was ready:\n{server.tail()}")
            try:
                if client.get(url + "/health").status_code == 200:
                    pending.pop(0)
                    continue
            except httpx.HTTPError:
                pass
            if time.monotonic() > end:
                raise TimeoutError(f"{server.name} not ready in {deadline_s:g}s:\n{server.tail()}")
            time.sleep(0.25)


# -- requests, metrics and the oracle ---------------------------------------------------------
@dataclass(frozen=True)
class Greedy:
    """A greedy completion: token ids, each one's log-probability and the top alternatives."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    top: tuple[dict[int, float], ...]
    body: dict[str, Any]


def _token_id(text: str) -> int:
    return int(text.removeprefix("token_id:"))


def greedy(body: dict[str, Any]) -> Greedy:
    """Parse a completions answer requested with ``return_tokens_as_token_ids``."""
    lp = body["choices"][0]["logprobs"]
    return Greedy(
        token_ids=tuple(_token_id(t) for t in lp["tokens"]),
        logprobs=tuple(float(x) for x in lp["token_logprobs"]),
        top=tuple({_token_id(t): float(v) for t, v in d.items()} for d in lp["top_logprobs"]),
        body=body,
    )


def oracle(expected: Greedy, actual: Greedy, tol: float) -> str | None:
    """None if ``actual`` is ``expected`` up to rounding, else why not.

    Position by position: the same token with log-probabilities within ``tol``; a different
    token only where the two were a near tie (each in the other's top-k within ``tol`` of the
    chosen one), after which the continuations legitimately diverge and comparison stops.
    """
    if len(expected.token_ids) != len(actual.token_ids):
        return f"lengths differ: {len(expected.token_ids)} vs {len(actual.token_ids)}"
    for i, (a, b) in enumerate(zip(expected.token_ids, actual.token_ids)):
        la, lb = expected.logprobs[i], actual.logprobs[i]
        if a == b:
            if not math.isclose(la, lb, abs_tol=tol):
                return f"token {i} ({a}): logprob {lb:.4f}, expected {la:.4f} (tol {tol})"
            continue
        tie = (
            b in expected.top[i]
            and a in actual.top[i]
            and abs(expected.top[i][b] - la) <= tol
            and abs(actual.top[i][a] - lb) <= tol
        )
        if tie:
            return None
        return f"token {i}: {b} (logprob {lb:.4f}), expected {a} (logprob {la:.4f})"
    return None


def max_gap(expected: Greedy, actual: Greedy) -> float:
    """Largest |logprob difference| over the positions where the tokens agree so far."""
    gaps = [0.0]
    for i, (a, b) in enumerate(zip(expected.token_ids, actual.token_ids)):
        if a != b:
            break
        gaps.append(abs(expected.logprobs[i] - actual.logprobs[i]))
    return max(gaps)


_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$")


def metric(client: httpx.Client, url: str, name: str, **labels: str) -> float:
    """Sum of the Prometheus samples ``name`` at ``url``/metrics whose labels include ``labels``."""
    total = 0.0
    for line in client.get(url + "/metrics").text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(3))
    return total
