"""zmq endpoints, and what a zmq connection's monitor events say about the peer behind it.

A SIGKILLed (or crashed, or stopped) producer's kernel closes its sockets: a zmq connection to
its side channel sees ``DISCONNECTED``, and a new one is refused at once (``CONNECT_RETRIED``
before any ``CONNECTED``). The handshake uses this to fail at once instead of waiting for
``transfer_timeout_s``; ``PeerWatch`` to notice an attached producer's exit. A host that dies
without closing its sockets (no FIN, no RST) is not seen here: its loads end at their timeouts.
"""

from __future__ import annotations

import zmq
from zmq.utils.monitor import recv_monitor_message

MONITOR_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_DISCONNECTED


def tcp_endpoint(host: str, port: int | str) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


class LinkState:
    """What one zmq connection's monitor events say: connected yet, and lost (why) or not."""

    def __init__(self, host: str, port: int) -> None:
        self.where = f"{host}:{port}"
        self.connected = False

    def lost(self, event: int) -> str | None:
        """The reason the peer is gone, or None while it may still be there."""
        if event == zmq.EVENT_CONNECTED:
            self.connected = True
        elif event == zmq.EVENT_DISCONNECTED:
            return f"the side channel at {self.where} closed the connection"
        elif event == zmq.EVENT_CONNECT_RETRIED and not self.connected:
            return f"the side channel at {self.where} refused the connection (nothing listens)"
        return None

    def drain(self, monitor: zmq.Socket[bytes]) -> str | None:
        """Read every pending event of ``monitor``; the first loss, if any."""
        while monitor.poll(0):
            reason = self.lost(int(recv_monitor_message(monitor)["event"]))
            if reason is not None:
                return reason
        return None
