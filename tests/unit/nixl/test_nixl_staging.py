"""Host-staged transfers (``kv_buffer_device: "cpu"``): cache -> host -> NIXL -> host -> cache.

Workers on a ``FakeFabric`` (READs move real bytes in-process) and, when NIXL is installed, on
real NIXL agents. On a CPU-only machine the caches are CPU tensors and the staging copies are
CPU -> CPU; with CUDA the same tests also run on GPU caches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from nixl_helpers import FakeClock, Node, spec, wait_for

from kvbridge.config import TransferConfig
from kvbridge.connector.types import KVCacheSpec
from kvbridge.nixl.fake import FakeNixlWrapper
from kvbridge.nixl.fake_fabric import FakeFabric
from kvbridge.nixl.metadata import NixlConnectorMetadata, NixlWorkerMetadata, RecvSpec, SendSpec
from kvbridge.nixl.staging import HostStaging
from kvbridge.nixl.transport import LiveCounts, NixlTransport
from kvbridge.nixl.worker import NixlWorker
from support.nixl_marks import needs_nixl

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ZERO = LiveCounts(0, 0, 0, 0)
P_BLOCKS, D_BLOCKS = [5, 9, 3], [1, 2, 7]


def node(
    role: str,
    engine_id: str,
    factory: Callable[[str], NixlTransport],
    clock: FakeClock,
    *,
    buffer: str,
    device: str = "cpu",
    s: KVCacheSpec | None = None,
    seed: int = 0,
) -> Node:
    s = s or spec()
    cfg = TransferConfig.from_dict(
        {
            "kv_connector": "NixlConnector",
            "kv_role": role,
            "engine_id": engine_id,
            "kv_buffer_device": buffer,
            "kv_connector_extra_config": {"side_channel_port": 0, "transfer_timeout_s": 100.0},
        }
    )
    made: list[NixlTransport] = []

    def make(name: str) -> NixlTransport:
        made.append(factory(name))
        return made[-1]

    worker = NixlWorker(cfg, s, transport_factory=make, clock=clock)
    gen = torch.Generator().manual_seed(seed)
    shape = (s.num_blocks, 2, s.block_size, s.num_kv_heads, s.head_dim)
    cache = {
        f"layers.{i}": torch.rand(shape, generator=gen).to(device) for i in range(s.num_layers)
    }
    worker.register_kv_caches(cache)
    fake = made[0] if isinstance(made[0], FakeNixlWrapper) else FakeNixlWrapper("unused")
    return Node(worker, fake, cache)


def hold(p: Node, rid: str = "p-1", blocks: tuple[list[int], ...] = (P_BLOCKS,)) -> frozenset[str]:
    """The producer's step that receives the hold; returns its finished_sending."""
    send = SendSpec(
        request_id=rid,
        num_blocks=sum(len(b) for b in blocks),
        lease_duration_s=30.0,
        abort_timeout_s=60.0,
        block_ids=blocks,
    )
    return p.step(NixlConnectorMetadata(reqs_to_send={rid: send}), finished=frozenset({rid}))[0]


def load(
    p: Node, local: tuple[list[int], ...] = (D_BLOCKS,), remote: tuple[list[int], ...] = (P_BLOCKS,)
) -> NixlConnectorMetadata:
    port = p.worker.side_channel_port
    assert port is not None
    spec_ = RecvSpec(
        request_id="d-1",
        local_block_ids=local,
        remote_engine_id="prefill",
        remote_host="127.0.0.1",
        remote_port=port,
        remote_block_ids=remote,
        remote_request_id="p-1",
    )
    return NixlConnectorMetadata(reqs_to_recv={"d-1": spec_})


def receive(d: Node, p: Node) -> set[int]:
    """Step both until the consumer reports d-1; returns its load-error blocks."""
    errors: set[int] = set()
    done: list[bool] = []

    def poll() -> None:
        _, recving, bad = d.step()
        errors.update(bad)
        done.append("d-1" in recving)
        p.sent.update(p.step()[0])  # type: ignore[attr-defined]

    p.sent = set()  # type: ignore[attr-defined]
    wait_for(lambda: any(done), poll=poll)
    d.worker.check_integrity()
    return errors


def freed(p: Node, rid: str = "p-1") -> None:
    """Step the producer until it reported ``rid`` in finished_sending."""
    wait_for(lambda: rid in p.sent, poll=lambda: p.sent.update(p.step()[0]))  # type: ignore[attr-defined]


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def host(n: Node) -> list[torch.Tensor]:
    """The host mirror of each layer, shaped like the cache (the mirror holds block rows)."""
    staging = n.worker.registered.staging
    assert staging is not None
    return [t.view(n.cache[name].shape) for name, t in zip(n.cache, staging.host_layers)]


@pytest.fixture
def fabric() -> FakeFabric:
    return FakeFabric()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cleanup() -> Iterator[list[Node]]:
    nodes: list[Node] = []
    yield nodes
    for n in nodes:
        n.worker.shutdown()
        assert n.worker.leaked == ZERO


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("p_buffer", "d_buffer"), [("cpu", "cpu"), ("cpu", "cuda"), ("cuda", "cpu")]
)
def test_blocks_land_in_the_right_cache_blocks_in_every_mix_of_modes(
    fabric: FakeFabric, clock: FakeClock, cleanup: list[Node], device: str, p_buffer: str,
    d_buffer: str,
) -> None:  # fmt: skip
    if device == "cuda" and "cuda" in (p_buffer, d_buffer):
        pytest.skip("the fake fabric moves host memory only; real NIXL covers VRAM")
    p = node("kv_producer", "prefill", fabric.wrapper, clock, buffer=p_buffer, device=device)
    d = node("kv_consumer", "decode", fabric.wrapper, clock, buffer=d_buffer, device=device, seed=1)
    cleanup += [d, p]
    before = {name: t.clone() for name, t in d.cache.items()}
    hold(p)
    d.step(load(p))
    assert receive(d, p) == set()
    for name, t in d.cache.items():
        assert torch.equal(t[D_BLOCKS], p.cache[name][P_BLOCKS]), name
        others = [b for b in range(t.shape[0]) if b not in D_BLOCKS]
        assert torch.equal(t[others], before[name][others]), f"{name}: other blocks changed"
    assert fabric.num_bytes_moved == 3 * 2 * spec().block_bytes_per_layer
    confirmer = d.worker.registered.reader.confirmer  # type: ignore[union-attr]
    assert confirmer.num_queries == 1  # the gate's answer, or the one asked with the READ
    freed(p)  # the READ's "done" notification ended the lease
    if d_buffer == "cpu":
        stats = d.worker.get_kv_connector_stats()
        assert stats is not None and len(stats.data["stage_in_time_seconds"]) == 1


def test_consumer_does_not_read_before_the_producer_staged_the_blocks(
    fabric: FakeFabric, clock: FakeClock, cleanup: list[Node]
) -> None:
    p = node("kv_producer", "prefill", fabric.wrapper, clock, buffer="cpu")
    d = node("kv_consumer", "decode", fabric.wrapper, clock, buffer="cpu", seed=1)
    cleanup += [d, p]
    for t in host(p):  # unwritten host memory may hold anything, even a freed cache's values
        t.fill_(-7.0)
    assert not torch.equal(host(p)[0][P_BLOCKS], p.cache["layers.0"][P_BLOCKS])  # not staged
    d.step(load(p))  # the params reached the consumer before the SendSpec reached P's worker
    confirmer = d.worker.registered.reader.confirmer  # type: ignore[union-attr]
    wait_for(lambda: confirmer.num_queries >= 3, poll=lambda: (clock.advance(0.05), d.step()))
    assert d.fake.calls_to("make_prepped_xfer") == []  # still waiting for "held"
    hold(p)
    assert torch.equal(host(p)[0][P_BLOCKS], p.cache["layers.0"][P_BLOCKS])
    errors: set[int] = set()
    wait_for(
        lambda: d.worker.num_inflight_loads == 0,
        poll=lambda: (clock.advance(0.05), errors.update(d.step()[2])),
    )
    assert errors == set()
    assert torch.equal(d.cache["layers.1"][D_BLOCKS], p.cache["layers.1"][P_BLOCKS])


def test_each_group_stages_only_its_own_blocks_on_its_own_layers(
    fabric: FakeFabric, clock: FakeClock, cleanup: list[Node]
) -> None:
    s = spec(num_groups=2)  # layers.0 in group 0, layers.1 in group 1
    p = node("kv_producer", "prefill", fabric.wrapper, clock, buffer="cpu", s=s)
    d = node("kv_consumer", "decode", fabric.wrapper, clock, buffer="cpu", s=s, seed=1)
    cleanup += [d, p]
    p_host_before = [t.clone() for t in host(p)]
    hold(p, blocks=([5, 9], [3, 4]))
    assert torch.equal(host(p)[0][[5, 9]], p.cache["layers.0"][[5, 9]])
    # group 1's ids: untouched (compared as bytes: the unwritten buffer may hold NaNs)
    assert same_bytes(host(p)[0][[3, 4]], p_host_before[0][[3, 4]])
    assert same_bytes(host(p)[1][[5, 9]], p_host_before[1][[5, 9]])
    d.step(load(p, local=([1, 2], [7, 8]), remote=([5, 9], [3, 4])))
    assert receive(d, p) == set()
    assert torch.equal(d.cache["layers.0"][[1, 2]], p.cache["layers.0"][[5, 9]])
    assert torch.equal(d.cache["layers.1"][[7, 8]], p.cache["layers.1"][[3, 4]])


def test_failed_copies_fail_the_hold_or_the_load_and_leak_nothing(
    fabric: FakeFabric, clock: FakeClock, cleanup: list[Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    p = node("kv_producer", "prefill", fabric.wrapper, clock, buffer="cpu")
    d = node("kv_consumer", "decode", fabric.wrapper, clock, buffer="cpu", seed=1)
    cleanup += [d, p]

    def broken(self: HostStaging, block_ids: Any) -> Any:
        raise RuntimeError("injected copy failure")

    # Consumer: the READ is confirmed, copying into the cache fails -> load errors.
    hold(p)
    monkeypatch.setattr(HostStaging, "stage_in", broken)
    d.step(load(p))
    assert receive(d, p) == set(D_BLOCKS)
    meta = d.worker.build_connector_worker_meta()
    assert isinstance(meta, NixlWorkerMetadata) and "injected" in meta.load_failures["d-1"]
    stats = d.worker.get_kv_connector_stats()  # a failed load counts once
    assert stats is not None and stats.data["num_failed_transfers"] == 1
    # Producer: staging fails -> the hold ends at once (blocks freed), never readable.
    monkeypatch.setattr(HostStaging, "stage_out", broken)
    assert hold(p, "p-2") == {"p-2"}
    assert p.worker.leases.outcome("p-2") == "expired"


@pytest.mark.integration
@needs_nixl
@pytest.mark.parametrize("device", DEVICES)
def test_real_nixl_moves_staged_blocks_between_two_agents(
    clock: FakeClock, cleanup: list[Node], device: str
) -> None:
    from kvbridge.nixl.wrapper import NixlWrapper

    p = node("kv_producer", "prefill", NixlWrapper, clock, buffer="cpu", device=device)
    d = node("kv_consumer", "decode", NixlWrapper, clock, buffer="cpu", device=device, seed=1)
    cleanup += [d, p]
    assert p.worker.registered.regions.memory_type == "DRAM"
    hold(p)
    d.step(load(p))
    assert receive(d, p) == set()
    for name, t in d.cache.items():
        assert torch.equal(t[D_BLOCKS], p.cache[name][P_BLOCKS]), name
    freed(p)  # a real "done" notification


def test_staging_on_a_device_without_copy_backend_names_nixl_not_the_cpu_tier() -> None:
    layers = [torch.empty(4, 2, 4, 2, 8, device="meta")]
    with pytest.raises(ValueError, match="^NixlConnector.*no copy backend.*'meta'") as err:
        HostStaging(layers, [[0]])
    assert "SimpleCPUOffloadConnector" not in str(err.value)
