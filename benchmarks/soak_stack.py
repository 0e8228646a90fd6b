"""The soak's servers in one process: a prefill (P) and a decode (D) ``kvbridge serve`` app,
each a MultiConnector of NixlConnector over real NIXL and a CPU tier, and the proxy in front.

P and D have fixed engine ids, so a restarted P comes back under the same id (and HTTP port),
as a restarted pod would. D's NIXL transport may be a ``FaultyTransport``.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from benchmarks.soak_faults import FaultLog, FaultPlan, FaultyTransport
from kvbridge.config import TransferConfig
from kvbridge.nixl.transport import LiveCounts, NixlTransport
from kvbridge.nixl.worker import NixlWorker
from kvbridge.serve.config_file import ServeConfig
from kvbridge.serve.http_server import BackgroundServer
from kvbridge.serve.proxy import build_proxy_app
from kvbridge.serve.server import ServerParts, build_server

if TYPE_CHECKING:
    from benchmarks.soak import SoakConfig

logger = logging.getLogger(__name__)

ROLES = ("producer", "consumer")


def engine_kwargs(config: SoakConfig) -> dict[str, Any]:
    return {"model": "tiny", "block_size": config.block_size, "max_num_seqs": 16}


def transfer_config(role: str, config: SoakConfig, wrapper: Any = None) -> TransferConfig:
    extra: dict[str, Any] = {
        "side_channel_port": 0,
        "kv_lease_duration_s": config.lease_s,
        "heartbeat_interval_s": 0.25,
        "slow_transfer_s": 30.0,
        "transfer_timeout_s": config.transfer_timeout_s,
    }
    if wrapper is not None:
        extra["nixl_wrapper"] = wrapper
    nixl = {"kv_connector": "NixlConnector", "kv_role": role, "kv_connector_extra_config": extra}
    offload = {
        "kv_connector": "SimpleCPUOffloadConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"num_cpu_blocks": config.cpu_blocks},
    }
    return TransferConfig.from_dict(
        {
            "kv_connector": "MultiConnector",
            "kv_role": role,
            "engine_id": f"soak-{role.removeprefix('kv_')}",
            "kv_connector_extra_config": {"connectors": [nixl, offload]},
        }
    )


def nixl_workers(parts: ServerParts) -> list[NixlWorker]:
    """The NIXL worker halves of a server's engine (children of its MultiConnector)."""
    top = parts.loop.engine.worker_connector
    children = getattr(top, "children", None) or [top]
    return [c for c in children if isinstance(c, NixlWorker)]


class SoakStack:
    """Runs in the soak process; owns P, D and the proxy, and D's injected faults."""

    def __init__(self, config: SoakConfig, plan: FaultPlan) -> None:
        self.config = config
        self.plan = plan
        self.faults = FaultLog()
        self.parts: dict[str, ServerParts] = {}
        self.servers: dict[str, BackgroundServer] = {}
        self.retired: list[tuple[str, ServerParts]] = []  # a restarted P's old server
        self._lock = threading.Lock()

    def _faulty(self, name: str) -> NixlTransport:
        from kvbridge.nixl.wrapper import NixlWrapper

        return FaultyTransport(NixlWrapper(name), self.plan, self.faults)

    def _build(self, role: str) -> ServerParts:
        config = self.config
        wrapper = self._faulty if role == "consumer" and self.plan.any else None
        serve = ServeConfig(
            **engine_kwargs(config),
            num_gpu_blocks=config.gpu_blocks,
            seed=config.producer_seed if role == "producer" else 0,  # 0: the reference's
            kv_transfer_config=transfer_config(f"kv_{role}", config, wrapper),
        )
        return build_server(serve)

    def start(self) -> str:
        """Start P, D and the proxy; the proxy's URL."""
        for role in ROLES:
            self.parts[role] = self._build(role)
            self.servers[role] = BackgroundServer(self.parts[role].app).start()
        urls = [self.servers[r].url for r in ROLES]
        self.servers["proxy"] = BackgroundServer(build_proxy_app([urls[0]], [urls[1]])).start()
        return self.servers["proxy"].url

    def restart_producer(self) -> None:
        """Stop P (its engine and connectors shut down), start a new one on the same port."""
        with self._lock:
            old = self.servers.pop("producer")
            port = old.port
            old.stop()
            self.retired.append(("producer (before the restart)", self.parts["producer"]))
            self.parts["producer"] = self._build("producer")
            self.servers["producer"] = BackgroundServer(
                self.parts["producer"].app, port=port
            ).start()
            self.faults.restarts += 1
        logger.info("soak: producer restarted on port %d", port)

    def shutdown_leaks(self) -> list[str]:
        """Stop everything; what a NIXL transport still held at its shutdown."""
        for name in ("proxy", *reversed(ROLES)):
            server = self.servers.pop(name, None)
            if server is not None:
                server.stop()
        out = []
        for role, parts in [*self.parts.items(), *self.retired]:
            for worker in nixl_workers(parts):
                if worker.leaked != LiveCounts(0, 0, 0, 0):
                    out.append(f"{role}: NIXL transport held {worker.leaked} at shutdown")
        return out
