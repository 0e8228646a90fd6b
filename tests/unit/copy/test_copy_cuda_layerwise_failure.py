"""``CUDACopyBackend`` batches failing part-way (``load_layers``, and ``load``, ``store`` and
``store_and_load``), on CPU: the CUDA calls it makes are
replaced by fakes that note which stream waited on which, so the ordering logic runs here."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

import kvbridge.copy.cuda as cuda_module
from kvbridge.copy.backend import CopyHandle, DoneHandle, parse_strategy
from kvbridge.copy.cuda import CUDACopyBackend


class FakeStream:
    def __init__(self, name: str) -> None:
        self.name = name
        self.waited_for: list[str] = []

    def wait_stream(self, other: FakeStream) -> None:
        self.waited_for.append(other.name)


class FailingDirect:
    """The direct copier: the second chunk's launch fails (e.g. its width will not compile)."""

    def __init__(self, current: list[FakeStream]) -> None:
        self.current = current
        self.launched: list[tuple[tuple[int, int], str]] = []

    def load(
        self, cpu_ids: torch.Tensor, gpu_ids: torch.Tensor, layers: tuple[int, int] | None = None
    ) -> None:
        assert layers is not None
        if self.launched:
            raise RuntimeError("injected: the kernel for this chunk could not be launched")
        self.launched.append((layers, self.current[-1].name))


def test_a_direct_load_failing_part_way_orders_the_compute_stream_after_its_chunks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compute, load = FakeStream("compute"), FakeStream("load")
    current = [compute]  # the stack of current streams

    @contextmanager
    def stream(s: FakeStream) -> Iterator[None]:
        current.append(s)
        try:
            yield
        finally:
            current.pop()

    def recorded(s: FakeStream, *keep_alive: torch.Tensor) -> CopyHandle:
        return DoneHandle()

    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    monkeypatch.setattr(cuda_module, "_recorded", recorded)
    monkeypatch.setattr(CUDACopyBackend, "_fence", lambda self, s: None)
    backend = object.__new__(CUDACopyBackend)
    direct = FailingDirect(current)
    backend.strategy = parse_strategy("direct")
    backend.gpu_layers = [torch.zeros(8, 4, dtype=torch.int64) for _ in range(4)]
    backend.block_layer_bytes = 32
    backend.min_copy_bytes = 1
    backend.cpu_blocks = None
    backend.device = torch.device("cpu")
    backend.load_stream = load  # type: ignore[assignment]
    backend._direct = direct  # type: ignore[assignment]

    with pytest.raises(RuntimeError, match="injected"):
        backend.load_layers([0, 1, 2], [5, 6, 7], [(0, 2), (2, 4)])
    assert direct.launched == [((0, 2), "load")]  # the first chunk was queued on the load stream
    # ... and still runs: the compute stream (what follows the failed step) waits for it
    assert compute.waited_for == ["load"]
    assert current == [compute]


@pytest.mark.parametrize("call", ["load", "store", "store_and_load"])
def test_a_batch_failing_part_way_orders_the_compute_stream_after_every_copy_stream(
    monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    """The async (not layerwise) path: a staged batch whose second chunk fails has its first
    chunk queued; what follows the failed step must wait for it, on every copy stream."""
    compute = FakeStream("compute")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    backend = object.__new__(CUDACopyBackend)
    backend.device = torch.device("cpu")
    names = ("load_stream", "load_copy_stream", "store_stream", "store_copy_stream")
    for name in names:
        setattr(backend, name, FakeStream(name))
    queued: list[str] = []

    def steps(plan: object, *, is_load: bool) -> Iterator[None]:
        queued.append("load" if is_load else "store")  # the first chunk is queued
        yield
        raise RuntimeError("injected: the next chunk's staging buffer could not be allocated")

    monkeypatch.setattr(backend, "_steps", steps)
    with pytest.raises(RuntimeError, match="injected"):
        if call == "store_and_load":
            backend.store_and_load([1, 2], [3, 4], [5, 6], [7, 8])
        else:
            getattr(backend, call)([1, 2], [3, 4])
    assert queued
    assert compute.waited_for == list(names)
