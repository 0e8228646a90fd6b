"""PeerWatch: a consumer learns that an attached producer is gone while it does nothing else.

One idle zmq connection per attached producer, to its side channel; when the producer exits
its kernel closes the socket and the connection's monitor says so (``LinkState``)::

    attach P  --watch(key, host, port)-->  [DEALER + monitor]  ...  DISCONNECTED  --on_lost(key)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import zmq

from kvbridge.nixl.zmq_links import MONITOR_EVENTS, LinkState, tcp_endpoint

logger = logging.getLogger(__name__)

_POLL_MS = 50


@dataclass
class _Watch:
    sock: zmq.Socket[bytes]
    monitor: zmq.Socket[bytes]
    link: LinkState


class PeerWatch:
    """Runs in a consumer worker; owns one thread and an idle zmq connection per watched peer.

    - ``watch`` and ``unwatch`` may be called from any thread; the sockets live in the watch's
      own thread (zmq sockets are not thread-safe).
    - ``on_lost(key, reason)`` is called from that thread, once per watch, when the peer's side
      channel refuses or drops the connection; the watch then ends.
    """

    def __init__(self, on_lost: Callable[[Hashable, str], None]) -> None:
        self._on_lost = on_lost
        self._lock = threading.Lock()
        self._todo: list[tuple[Hashable, tuple[str, int] | None]] = []  # (key, endpoint or drop)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, key: Hashable, host: str, port: int) -> None:
        """Watch the side channel at ``host:port`` (replacing any watch under ``key``)."""
        with self._lock:
            if self._stop.is_set():
                return
            self._todo.append((key, (host, port)))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="kvbridge-nixl-watch", daemon=True
                )
                self._thread.start()

    def unwatch(self, key: Hashable) -> None:
        with self._lock:
            self._todo.append((key, None))

    def _run(self) -> None:
        ctx = zmq.Context()
        watches: dict[Hashable, _Watch] = {}  # key -> its connection
        try:
            while not self._stop.is_set():
                with self._lock:
                    todo, self._todo = self._todo, []
                for key, endpoint in todo:
                    _close(watches.pop(key, None))
                    if endpoint is not None:
                        watches[key] = _open(ctx, *endpoint)
                if not watches:
                    self._stop.wait(_POLL_MS / 1000)
                    continue
                poller = zmq.Poller()
                for w in watches.values():
                    poller.register(w.monitor, zmq.POLLIN)
                ready = dict(poller.poll(_POLL_MS))
                for key, w in list(watches.items()):
                    reason = w.link.drain(w.monitor) if w.monitor in ready else None
                    if reason is not None:
                        _close(watches.pop(key))
                        self._report(key, reason)
        finally:
            for w in watches.values():
                _close(w)
            ctx.term()

    def _report(self, key: Hashable, reason: str) -> None:
        try:
            self._on_lost(key, reason)
        except Exception:  # the watch thread must outlive a failing callback
            logger.exception("handling the loss of %s failed", key)

    def close(self) -> None:
        """Stop the thread and close every connection; idempotent."""
        with self._lock:
            self._stop.set()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5)


def _open(ctx: zmq.Context[zmq.Socket[bytes]], host: str, port: int) -> _Watch:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if ":" in host:
        sock.setsockopt(zmq.IPV6, 1)
    monitor = sock.get_monitor_socket(MONITOR_EVENTS)
    sock.connect(tcp_endpoint(host, port))
    return _Watch(sock, monitor, LinkState(host, port))


def _close(w: _Watch | None) -> None:
    if w is None:
        return
    w.sock.disable_monitor()
    w.monitor.close()
    w.sock.close()
