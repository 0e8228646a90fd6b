"""Which NIXL transport a worker builds: real NIXL, the fake, or a caller's callable."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, MutableMapping

from kvbridge.nixl.settings import NixlSettings
from kvbridge.nixl.transport import LiveCounts, NixlTransport

logger = logging.getLogger(__name__)

TransportFactory = Callable[[str], NixlTransport]
NOTIFY_SUFFIX = "-notify"  # the notification agent's name: the worker's agent name + this
# UCX settings a worker that registers VRAM defaults (an operator's own value wins): NIXL reads
# are UCX GETs, and UCX's "auto" turns cuda_ipc GET off where it finds no NVLink (one GPU, or
# PCIe-only peers), which leaves those READs to a TCP emulation (0.59 GB/s for 1 GiB on one
# H200, docs/benchmarks.md) where a device copy is possible.
VRAM_UCX_DEFAULTS = {"UCX_CUDA_IPC_ENABLE_GET_ZCOPY": "y"}


def make_notifier(factory: TransportFactory, agent_name: str) -> NixlTransport | None:
    """A consumer worker's second agent, for its notifications ("done", heartbeats,
    "release") alone; None when it cannot be made (they go through the worker's own agent).

    On UCX a READ completes only after its endpoint is flushed, and the first flush after an
    active message (a notification) on that endpoint waits for the peer: a "done" sent on the
    READ agent's endpoint made the next READ from that producer 25-60 us slower on loopback
    (``cma``/``tcp``, docs/benchmarks.md, "Small READs"). A second agent has endpoints of
    its own. It registers no memory; ``RemoteEngines`` loads each producer on it too.
    """
    try:
        return factory(agent_name + NOTIFY_SUFFIX)
    except Exception as e:  # any failure only costs the separation, never a notification
        logger.warning("no notification agent for %s (%s): notifying via its own", agent_name, e)
        return None


def apply_ucx_defaults(
    memory_type: str,
    backends: tuple[str, ...],
    env: MutableMapping[str, str] | None = None,
) -> dict[str, str]:
    """Set ``VRAM_UCX_DEFAULTS`` in ``env`` (the process environment) for a UCX agent about to
    register VRAM, leaving any key already set; returns what it set. UCX reads its settings
    when the agent's backend starts, so call this before making the agent."""
    if memory_type != "VRAM" or "UCX" not in backends:
        return {}
    env = os.environ if env is None else env
    applied = {k: v for k, v in VRAM_UCX_DEFAULTS.items() if k not in env}
    env.update(applied)
    if applied:
        logger.info("NIXL on VRAM: %s (set the variables to override)", applied)
    return applied


def add_counts(a: LiveCounts, b: LiveCounts) -> LiveCounts:
    return LiveCounts(*(x + y for x, y in zip(a, b, strict=True)))


def make_transport_factory(settings: NixlSettings) -> TransportFactory:
    """``nixl_wrapper``: "nixl" (real NIXL), "fake" (``FakeNixlWrapper``) or a callable."""
    wrapper = settings.nixl_wrapper
    if callable(wrapper):
        return wrapper
    if wrapper == "fake":
        from kvbridge.nixl.fake import FakeNixlWrapper

        return lambda name: FakeNixlWrapper(name, **settings.fake_nixl)
    from kvbridge.nixl.wrapper import NixlWrapper

    return lambda name: NixlWrapper(
        name, backends=settings.backends, progress_delay_us=settings.progress_delay_us
    )
