"""Builders shared by the NixlConnector tests: specs, clocks, workers on FakeNixlWrapper."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from kvbridge.config import TransferConfig
from kvbridge.connector.types import KVCacheGroupSpec, KVCacheSpec, SimpleRequest
from kvbridge.nixl.fake import FakeNixlWrapper
from kvbridge.nixl.metadata import NixlConnectorMetadata
from kvbridge.nixl.transport import LiveCounts
from kvbridge.nixl.worker import NixlWorker

BLOCK_SIZE = 4
NUM_BLOCKS = 16


def spec(num_groups: int = 1, num_blocks: int = NUM_BLOCKS, **over: Any) -> KVCacheSpec:
    layers = max(2, num_groups)
    groups = tuple(
        KVCacheGroupSpec(
            f"g{i}", tuple(f"layers.{j}" for j in range(layers) if j % num_groups == i)
        )
        for i in range(num_groups)
    )
    values: dict[str, Any] = {
        "block_size": BLOCK_SIZE,
        "num_blocks": num_blocks,
        "num_layers": layers,
        "num_kv_heads": 2,
        "head_dim": 4,
        "dtype": "float32",
        "groups": groups,
    }
    values.update(over)
    return KVCacheSpec(**values)


def config(role: str, engine_id: str, **extra: Any) -> TransferConfig:
    extra.setdefault("nixl_wrapper", "fake")
    extra.setdefault("side_channel_port", 0)
    return TransferConfig.from_dict(
        {
            "kv_connector": "NixlConnector",
            "kv_role": role,
            "engine_id": engine_id,
            "kv_connector_extra_config": extra,
        }
    )


def kv_caches(s: KVCacheSpec, fill: float | None = None) -> dict[str, torch.Tensor]:
    shape = (s.num_blocks, 2, s.block_size, s.num_kv_heads, s.head_dim)
    out = {}
    for i in range(s.num_layers):
        t = torch.zeros(shape) if fill is None else torch.full(shape, fill + i)
        out[f"layers.{i}"] = t
    return out


def request(
    rid: str, n: int, params: dict[str, Any] | None = None, computed: int = 0
) -> SimpleRequest:
    return SimpleRequest(
        request_id=rid,
        prompt_token_ids=list(range(n)),
        kv_transfer_params=params,
        num_computed_tokens=computed,
    )


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Node:
    """A worker on its own FakeNixlWrapper."""

    worker: NixlWorker
    fake: FakeNixlWrapper
    cache: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def sent_notifs(self) -> list[tuple[str, bytes]]:
        """What this worker notified: a consumer through its notification agent."""
        return (
            self.fake.sent_notifs
            if self.worker.registered.reader is None
            else (notifier_of(self.worker).sent_notifs)
        )

    def step(
        self, meta: NixlConnectorMetadata | None = None, finished: frozenset[str] = frozenset()
    ) -> tuple[frozenset[str], frozenset[str], set[int]]:
        """One engine step: bind, start loads, report (sending, recving, load-error blocks)."""
        self.worker.bind_connector_metadata(meta or NixlConnectorMetadata())
        self.worker.start_load_kv()
        sending, recving = self.worker.get_finished(finished)
        errors = self.worker.get_block_ids_with_load_errors()
        self.worker.clear_connector_metadata()
        return sending, recving, errors


def make_node(
    role: str,
    engine_id: str,
    clock: Callable[[], float] = time.monotonic,
    cycles: int = 0,
    s: KVCacheSpec | None = None,
    **extra: Any,
) -> Node:
    s = s or spec()
    holder: list[FakeNixlWrapper] = []

    def factory(name: str) -> FakeNixlWrapper:
        holder.append(FakeNixlWrapper(name, cycles_before_xfer_done=cycles))
        return holder[-1]

    worker = NixlWorker(config(role, engine_id, **extra), s, transport_factory=factory, clock=clock)
    cache = kv_caches(s)
    worker.register_kv_caches(cache)
    return Node(worker, holder[0], cache)


def notifier_of(worker: NixlWorker) -> FakeNixlWrapper:
    """The fake a consumer worker notifies producers through (its notification agent)."""
    reader = worker.registered.reader
    assert reader is not None and isinstance(reader.engines.notifier, FakeNixlWrapper)
    return reader.engines.notifier


def serving(node: Node) -> Iterator[Node]:
    """A fixture body: yield ``node``, then shut it down and check it released everything."""
    yield node
    node.worker.shutdown()
    assert node.worker.leaked == LiveCounts(0, 0, 0, 0)


def wait_for(
    predicate: Callable[[], bool], timeout: float = 5.0, poll: Callable[[], Any] | None = None
) -> None:
    """Poll ``predicate`` (calling ``poll`` between tries) until true or fail at ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        if poll is not None:
            poll()
        time.sleep(0.005)


@contextmanager
def silent_port() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts connections and never answers (a wedged producer)."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        yield srv.getsockname()[1]
