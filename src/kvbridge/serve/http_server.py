"""Running an ASGI app with uvicorn: in the foreground (the CLIs) or in a background thread."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

import uvicorn

logger = logging.getLogger(__name__)


def uvicorn_config(app: Any, **kwargs: Any) -> uvicorn.Config:
    kwargs.setdefault("log_level", "warning")
    return uvicorn.Config(
        app,
        lifespan="on",
        access_log=False,
        timeout_graceful_shutdown=5,
        **kwargs,
    )


class ReadyServer(uvicorn.Server):
    """``uvicorn.Server`` that calls ``on_ready`` once it listens."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_ready = on_ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.should_exit:
            self._on_ready()


def bind_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket (``port=0``: a free one); uvicorn listens on it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only for it; with
    # protocol 0 every kept-alive reply waited ~40 ms (Nagle + delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def serve_forever(app: Any, host: str, port: int, on_ready: Callable[[str], None]) -> None:
    """Run ``app`` in the foreground until SIGINT/SIGTERM; ``on_ready(url)`` once it listens."""
    sock = bind_socket(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    url = f"http://{bound_host}:{bound_port}"
    server = ReadyServer(uvicorn_config(app), lambda: on_ready(url))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


class BackgroundServer:
    """Runs in a background thread of the calling process; owns one uvicorn server and its
    listening socket (bound before start, so ``port=0`` gives a free port with no race)."""

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._sock = bind_socket(host, port)
        self.host, self.port = self._sock.getsockname()[:2]
        self._ready = threading.Event()
        self._server = ReadyServer(uvicorn_config(app), self._ready.set)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> BackgroundServer:
        """Start and wait until it accepts connections; raises if it fails or times out."""
        self._thread.start()
        waited = 0.0
        while not self._ready.wait(0.05):
            waited += 0.05
            if not self._thread.is_alive():
                raise RuntimeError(f"server on {self.url} failed to start (see the log)")
            if waited > timeout_s:
                self.stop()
                raise TimeoutError(f"server on {self.url} not ready after {timeout_s}s")
        return self

    def stop(self, timeout_s: float = 15.0) -> None:
        """Ask uvicorn to exit (running the app's shutdown) and wait for the thread."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
