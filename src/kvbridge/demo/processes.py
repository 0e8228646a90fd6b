"""ServiceProcess and ProcessSet: the demo's child processes (servers, proxy), started and stopped.
``stop_group`` stops a process group (also for the vLLM P/D benchmark and its tests).

Each child runs in a process group of its own (so a Ctrl-C in the terminal reaches only the demo,
which then stops the children in order); a reader thread copies its output to a log file and
watches for the ``listening on URL`` line that ``kvbridge serve`` and ``kvbridge proxy`` print
once they accept connections.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

logger = logging.getLogger(__name__)

READY_LINE = re.compile(r"listening on (https?://\S+)")


class ServiceError(RuntimeError):
    """A child process failed to start, or died; the message names it and its log file."""


def stop_group(proc: subprocess.Popen[bytes], term_s: float | None, kill_s: float) -> None:
    """Stop the process group of ``proc`` (started with ``start_new_session``): SIGTERM, then
    SIGKILL if any member outlives ``term_s`` (None: SIGKILL at once); each signal is followed
    by SIGCONT, so a stopped group acts on it too. Returns once the group is gone, or
    ``kill_s`` after the SIGKILL."""
    steps = [(signal.SIGTERM, term_s)] if term_s is not None else []
    for sig, wait_s in [*steps, (signal.SIGKILL, kill_s)]:
        try:
            os.killpg(proc.pid, sig)
            os.killpg(proc.pid, signal.SIGCONT)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader; the group lives while any member does
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


class ServiceProcess:
    """Runs in the demo process; owns one child process (its own process group), its log file
    and the thread that copies the child's output there and watches for the ready line."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(os.environ if env is None else env)
        self.url: str | None = None
        self._ready = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def start(self) -> None:
        self._proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,  # its own process group: killpg reaches all it started
        )
        self._reader = threading.Thread(
            target=self._copy_output, name=f"demo-log-{self.name}", daemon=True
        )
        self._reader.start()

    def _copy_output(self) -> None:
        proc = self._proc
        if proc is None or proc.stdout is None:
            return
        with self.log_path.open("wb") as log:
            for raw in proc.stdout:
                log.write(raw)
                log.flush()
                if self.url is None:
                    match = READY_LINE.search(raw.decode("utf-8", errors="replace"))
                    if match:
                        self.url = match.group(1).rstrip(").,;")
                        self._ready.set()
        proc.stdout.close()

    def wait_ready(self, deadline: float) -> str:
        """The URL from the ready line; ``ServiceError`` if the child exits or the deadline
        (a ``time.monotonic()`` value) passes first."""
        while not self._ready.wait(0.05):
            code = self.returncode
            if code is not None:
                self.join_reader(1.0)  # the log may still hold the child's last words
                raise ServiceError(
                    f"{self.name} exited with code {code} before it listened; "
                    f"last lines of {self.log_path}:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"{self.name} not listening in time; last lines of {self.log_path}:\n"
                    f"{self.tail()}"
                )
        url = self.url
        if url is None:  # cannot happen: the event is set after the URL
            raise ServiceError(f"{self.name}: ready without a URL")
        return url

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join("    " + line for line in text.splitlines()[-lines:])

    def signal_group(self, sig: signal.Signals) -> bool:
        """Send ``sig`` to the child's process group; False if the group is gone."""
        if self._proc is None:
            return False
        try:
            os.killpg(self._proc.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def group_alive(self) -> bool:
        """Whether any process of the child's group is still alive (zombies reaped first)."""
        if self._proc is None:
            return False
        self._proc.poll()
        try:
            os.killpg(self._proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def reap(self, timeout_s: float) -> int | None:
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def join_reader(self, timeout_s: float) -> None:
        """Wait for the log copier (it ends when the child's output closes)."""
        if self._reader is not None:
            self._reader.join(timeout_s)


class ProcessSet:
    """Runs in the demo process; owns every child it started and stops them all on exit:
    SIGTERM to each process group, then SIGKILL to the groups still alive at the deadline."""

    def __init__(self, run_dir: Path, env: Mapping[str, str] | None = None) -> None:
        self.run_dir = run_dir
        self.env = dict(os.environ if env is None else env)
        self.services: list[ServiceProcess] = []

    def start(self, name: str, argv: Sequence[str]) -> ServiceProcess:
        service = ServiceProcess(name, argv, self.run_dir / f"{name}.log", self.env)
        self.services.append(service)
        service.start()
        logger.info("started %s (pid %s): %s", name, service.pid, " ".join(argv))
        return service

    def check_alive(self) -> None:
        """``ServiceError`` naming the first child that has exited."""
        for service in self.services:
            code = service.returncode
            if code is not None:
                raise ServiceError(
                    f"{service.name} exited with code {code}; last lines of "
                    f"{service.log_path}:\n{service.tail()}"
                )

    def stop_all(self, timeout_s: float = 15.0) -> list[str]:
        """Stop every child; returns the names of those that needed SIGKILL."""
        deadline = time.monotonic() + timeout_s
        for service in self.services:
            service.signal_group(signal.SIGTERM)
        killed: list[str] = []
        for service in self.services:
            service.reap(max(0.0, deadline - time.monotonic()))
            while service.group_alive() and time.monotonic() < deadline:
                time.sleep(0.02)  # a grandchild may outlive the child briefly
            if service.group_alive():
                killed.append(service.name)
                service.signal_group(signal.SIGKILL)
                service.reap(5.0)
            service.join_reader(2.0)
        if killed:
            logger.warning("sent SIGKILL to %s after %.0fs", ", ".join(killed), timeout_s)
        self.services.clear()
        return killed

    def __enter__(self) -> ProcessSet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()
