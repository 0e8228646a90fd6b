"""The demo's P/D stack: config files for a prefill and a decode server, and their start-up.

Two variants, started one after the other so they never compete for the CPU:
- ``reuse``: both servers with MultiConnector (NixlConnector + SimpleCPUOffloadConnector) and
  prefix caching; the prefill server's GPU cache is kept small so that returning conversations
  are evicted from it and come back from the CPU tier.
- ``baseline``: NixlConnector only and no prefix caching: every prompt is computed in full on
  the prefill server and read in full by the decode server.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

from kvbridge.demo.processes import ProcessSet

BLOCK_SIZE = 16


@dataclass(frozen=True)
class StackSizes:
    """KV cache sizes (in blocks) that fit the workload's longest prompt."""

    prefill_gpu_blocks: int
    decode_gpu_blocks: int
    cpu_blocks: int

    @classmethod
    def for_workload(
        cls, *, longest_prompt: int, shared_prefix: int, max_tokens: int, users: int
    ) -> StackSizes:
        per_request = math.ceil((longest_prompt + max_tokens) / BLOCK_SIZE) + 1
        shared = shared_prefix // BLOCK_SIZE
        everything = shared + users * (per_request - shared)  # all conversations' blocks
        # Prefill: one longest prompt and a little more, less than all conversations together,
        # so a returning user's prefix has often been evicted from the GPU by the others.
        prefill = per_request + 4
        decode = max(users * per_request + 16, 128)
        # CPU tier: most (not all) conversations, so some CPU blocks are evicted too.
        cpu = max(per_request, (3 * everything) // 4)
        return cls(prefill, decode, cpu)


def _nixl(role: str, kv_buffer_device: str | None = None) -> dict[str, Any]:
    # side_channel_port 0: the prefill server picks a free port and puts it in the params.
    extra = {"side_channel_host": "127.0.0.1", "side_channel_port": 0}
    config = {"kv_connector": "NixlConnector", "kv_role": role, "kv_connector_extra_config": extra}
    if kv_buffer_device is not None:
        config["kv_buffer_device"] = kv_buffer_device
    return config


def _offload(num_cpu_blocks: int, disk: DiskTierPlan | None) -> dict[str, Any]:
    extra: dict[str, Any] = {"num_cpu_blocks": num_cpu_blocks}
    if disk is not None:  # both servers share the directory (and each its byte budget)
        extra.update(
            kv_offload_backend="disk", disk_path=disk.path, disk_capacity_bytes=disk.capacity_bytes
        )
    return {
        "kv_connector": "SimpleCPUOffloadConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": extra,
    }


class DiskTierPlan(NamedTuple):
    """The disk tier behind the CPU tier: its directory and byte budget per server."""

    path: str
    capacity_bytes: int


def transfer_config(
    role: str,
    *,
    reuse: bool,
    cpu_blocks: int,
    disk: DiskTierPlan | None = None,
    kv_buffer_device: str | None = None,
) -> dict[str, Any]:
    """The ``kv_transfer_config`` (vLLM format) of one server of the stack (``kv_buffer_device``
    of its NIXL connector: None for the default)."""
    if not reuse:
        return _nixl(role, kv_buffer_device)
    children = [_nixl(role, kv_buffer_device), _offload(cpu_blocks, disk)]
    return {
        "kv_connector": "MultiConnector",
        "kv_role": role,
        "kv_connector_extra_config": {"connectors": children},
    }


@dataclass(frozen=True)
class StackPlan:
    """What one stack runs: the model and the two servers' settings."""

    name: str
    reuse: bool
    model: str
    device: str
    seed: int
    sizes: StackSizes
    disk: DiskTierPlan | None = None
    kv_buffer_device: str | None = None  # NIXL's; None: the connector's default

    def serve_config(self, role: str) -> dict[str, Any]:
        """A ``kvbridge serve --config`` file's content for ``kv_producer``/``kv_consumer``."""
        blocks = (
            self.sizes.prefill_gpu_blocks if role == "kv_producer" else self.sizes.decode_gpu_blocks
        )
        return {
            "model": self.model,
            "device": self.device,
            "seed": self.seed,
            "host": "127.0.0.1",
            "port": 0,
            "block_size": BLOCK_SIZE,
            "num_gpu_blocks": blocks,
            "enable_prefix_caching": self.reuse,
            "kv_transfer_config": transfer_config(
                role,
                reuse=self.reuse,
                cpu_blocks=self.sizes.cpu_blocks,
                disk=self.disk,
                kv_buffer_device=self.kv_buffer_device,
            ),
        }


class StackUrls(NamedTuple):
    """Base URLs of a running prefill server, decode server and proxy."""

    prefill: str
    decode: str
    proxy: str


def _kvbridge(*args: str, log_level: str) -> list[str]:
    return [sys.executable, "-m", "kvbridge.cli", "--log-level", log_level, *args]


def start_stack(
    procs: ProcessSet, plan: StackPlan, *, timeout_s: float, log_level: str = "WARNING"
) -> StackUrls:
    """Write the config files, start both servers (in parallel), then the proxy in front."""
    deadline = time.monotonic() + timeout_s
    urls: dict[str, str] = {}
    started = []
    for role, short in (("kv_producer", "prefill"), ("kv_consumer", "decode")):
        path = procs.run_dir / f"{plan.name}-{short}.json"
        path.write_text(json.dumps(plan.serve_config(role), indent=2) + "\n")
        argv = _kvbridge("serve", "--config", str(path), log_level=log_level)
        started.append((short, procs.start(f"{plan.name}-{short}", argv)))
    for short, service in started:
        urls[short] = service.wait_ready(deadline)
    proxy_path = procs.run_dir / f"{plan.name}-proxy.json"
    proxy_config = {"prefill": [urls["prefill"]], "decode": [urls["decode"]], "port": 0}
    proxy_path.write_text(json.dumps(proxy_config, indent=2) + "\n")
    argv = _kvbridge("proxy", "--config", str(proxy_path), log_level=log_level)
    proxy = procs.start(f"{plan.name}-proxy", argv)
    return StackUrls(urls["prefill"], urls["decode"], proxy.wait_ready(deadline))
