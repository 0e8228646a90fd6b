"""Copy backends: the interface, run planning, completion handles, and a lazy registry.

A backend moves whole blocks between the engine's per-layer KV tensors ("GPU" side, even on
a CPU-only machine) and host tensors of the same block shape (the CPU tier's pool, NIXL's host
staging buffer), a few tensor ops per batch (per run of consecutive block ids and layer),
never one op per block when ids are consecutive. Nothing here imports torch at runtime.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import torch

# name -> "module:Class"; imported only when that backend is built.
_BACKENDS: dict[str, str] = {
    "cpu": "kvbridge.copy.cpu:CPUCopyBackend",
    "cuda": "kvbridge.copy.cuda:CUDACopyBackend",
}
# How the CUDA backend copies (``CUDACopyBackend``); "STORE/LOAD" picks one per direction;
# "auto" picks per batch from its shape.
STRATEGIES = ("auto", "serial", "pipelined", "direct")


class CopyStrategy(NamedTuple):
    """The strategy of each direction."""

    store: str
    load: str


def parse_strategy(value: str) -> CopyStrategy:
    """``"NAME"`` for both directions or ``"STORE/LOAD"``, each one of ``STRATEGIES``."""
    names = value.split("/")
    if len(names) not in (1, 2) or any(n not in STRATEGIES for n in names):
        raise ValueError(
            f"copy_strategy: {value!r} is not one of {', '.join(STRATEGIES)} "
            "(or STORE/LOAD, e.g. 'direct/pipelined')"
        )
    return CopyStrategy(names[0], names[-1])


class CopyPlan(NamedTuple):
    """Block pairs sorted by the ``keyed`` side, split into runs of consecutive keyed ids.

    ``runs`` holds ``(offset, length)`` into the two lists; within a run
    ``keyed[offset + i] == keyed[offset] + i``.
    """

    keyed: list[int]
    other: list[int]
    runs: list[tuple[int, int]]


def plan_runs(keyed: Sequence[int], other: Sequence[int]) -> CopyPlan:
    """Sort the pairs ``(keyed[i], other[i])`` by ``keyed`` and find its consecutive runs."""
    if len(keyed) != len(other):
        raise ValueError(f"plan_runs: {len(keyed)} keyed ids but {len(other)} other ids")
    pairs = sorted(zip(keyed, other))
    keys = [k for k, _ in pairs]
    runs: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[i - 1] + 1:
            runs.append((start, i - start))
            start = i
    return CopyPlan(keys, [o for _, o in pairs], runs if keys else [])


class CopyHandle(ABC):
    """One launched batch of copies."""

    @abstractmethod
    def done(self) -> bool:
        """Whether the copies finished; raises if they failed."""

    @abstractmethod
    def wait(self) -> None:
        """Block until the copies finished; raises if they failed."""

    def order_before_current(self) -> None:
        """Make the work queued next on the caller's (compute) stream run after these copies;
        the default waits on the host, a device backend makes the stream wait instead."""
        self.wait()


class DoneHandle(CopyHandle):
    """A batch that completed synchronously."""

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        return None


class AllDone(CopyHandle):
    """Completion of several batches (e.g. one per KV cache group)."""

    def __init__(self, handles: list[CopyHandle]) -> None:
        self._handles = handles

    def done(self) -> bool:
        self._handles = [h for h in self._handles if not h.done()]
        return not self._handles

    def wait(self) -> None:
        for handle in self._handles:
            handle.wait()
        self._handles = []


class CopyBackend(ABC):
    """Runs in a worker; copies KV blocks between the engine's cache and host tensors.

    Both sides are per-layer tensors ``[num_blocks, ...]`` with one block contiguous per layer
    (the CPU side may be strided views of a block-major pool, ``allocate_cpu_layers``);
    layer ``i`` of one side pairs with layer ``i`` of the other. Copies are ordered after the
    work already queued on the cache (the forward that wrote a stored block, the last reader of
    a loaded one); the caller keeps the blocks of a batch alive until its handle is done.
    ``copy_strategy`` (``parse_strategy``; None: the default) matters where there is a choice.
    """

    def __init__(
        self,
        gpu_layers: Sequence[torch.Tensor],
        cpu_layers: Sequence[torch.Tensor],
        copy_strategy: str | None = None,
    ) -> None:
        if len(gpu_layers) != len(cpu_layers) or not gpu_layers:
            raise ValueError(
                f"{type(self).__name__}: {len(gpu_layers)} cache layers but "
                f"{len(cpu_layers)} CPU layers"
            )
        self.gpu_layers = list(gpu_layers)
        self.cpu_layers = list(cpu_layers)

    @classmethod
    @abstractmethod
    def allocate_cpu_layers(
        cls, gpu_layers: Sequence[torch.Tensor], num_cpu_blocks: int, *, block_major: bool = False
    ) -> list[torch.Tensor]:
        """Host tensors mirroring ``gpu_layers`` with ``num_cpu_blocks`` blocks each.

        Layer-major (default): one pool ``[layers, num_cpu_blocks, *block]``, a contiguous
        tensor per layer. ``block_major``: ``[num_cpu_blocks, layers, *block]``, each layer a
        strided view, so one CPU block (every layer of it) is one contiguous range and a
        scattered CPU id costs one copy instead of one per layer.
        """

    @abstractmethod
    def store(self, gpu_ids: Sequence[int], cpu_ids: Sequence[int]) -> CopyHandle:
        """Copy cache blocks ``gpu_ids[i]`` into CPU blocks ``cpu_ids[i]``."""

    @abstractmethod
    def load(self, cpu_ids: Sequence[int], gpu_ids: Sequence[int]) -> CopyHandle:
        """Copy CPU blocks ``cpu_ids[i]`` into cache blocks ``gpu_ids[i]``."""

    def load_layers(
        self, cpu_ids: Sequence[int], gpu_ids: Sequence[int], chunks: Sequence[tuple[int, int]]
    ) -> list[CopyHandle]:
        """``load(cpu_ids, gpu_ids)`` in chunks of layers ``[lo, hi)`` (in order, covering every
        layer), one handle per chunk, so layer ``lo`` can compute while later chunks still
        copy. The default loads everything at once and shares one handle."""
        handle = self.load(cpu_ids, gpu_ids)
        return [handle] * len(chunks)

    def store_and_load(
        self,
        store_gpu: Sequence[int],
        store_cpu: Sequence[int],
        load_cpu: Sequence[int],
        load_gpu: Sequence[int],
    ) -> tuple[CopyHandle, CopyHandle]:
        """``store(store_gpu, store_cpu)`` and ``load(load_cpu, load_gpu)`` launched together
        (disjoint blocks); a backend may interleave them so both directions start at once."""
        return self.store(store_gpu, store_cpu), self.load(load_cpu, load_gpu)

    def shutdown(self) -> None:  # noqa: B027
        """Release streams and staging memory. Idempotent."""


def layer_chunks(num_layers: int, layer_bytes: int, min_chunk_bytes: int) -> list[tuple[int, int]]:
    """Layers ``0..num_layers`` in consecutive chunks ``[lo, hi)`` of at least
    ``min_chunk_bytes`` each (``layer_bytes`` per layer; the last chunk may be smaller), so a
    small load is not split into copies too small to run at PCIe speed. Chunks are a power of
    two layers wide but the last (``num_layers`` modulo that width) or all layers: the direct
    kernel is compiled per width, so a model sees a few widths (Llama-8B's 32 layers: 1, 2,
    4, 8, 16, 32), never one per load size."""
    if num_layers < 1:
        raise ValueError(f"layer_chunks: num_layers must be >= 1, got {num_layers}")
    need = max(1, -(-min_chunk_bytes // max(1, layer_bytes)))
    per = min(num_layers, 1 << (need - 1).bit_length())  # a power of two: few distinct widths
    return [(lo, min(num_layers, lo + per)) for lo in range(0, num_layers, per)]


def copy_backend_class(device_type: str, *, user: str) -> type[CopyBackend]:
    """The backend for KV tensors on ``device_type`` (``tensor.device.type``), imported on first
    use; ``user`` (who needs the copies) starts the error message."""
    if device_type not in _BACKENDS:
        raise ValueError(
            f"{user}: no copy backend for KV caches on {device_type!r}; "
            f"supported: {', '.join(sorted(_BACKENDS))}"
        )
    module_name, class_name = _BACKENDS[device_type].split(":")
    cls: type[CopyBackend] = getattr(importlib.import_module(module_name), class_name)
    return cls
