"""A deliberately broken CPU tier for control tests: its loads copy another prompt's blocks.

Built through kvbridge's public extension point (a connector class named by
``kv_connector_module_path``), so real engines — vLLM included — load it like any connector.
A correctness oracle that cannot tell its output from the right one is too weak.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kvbridge.copy.backend import CopyHandle
from kvbridge.offload.connector import SimpleCPUOffloadConnector
from kvbridge.offload.worker import CPUOffloadWorker

if TYPE_CHECKING:
    import torch


class _OtherPromptLoads:
    """Delegates to the real copy backend, but a load reads CPU blocks stored for other ids.

    Blocks of one prompt in another order would not do: with random weights attention is
    nearly uniform, so a permuted prefix gives the same output. Another prompt's KV does not.
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._stored: list[int] = []  # CPU ids in the order they were stored

    def store(self, gpu_ids: Sequence[int], cpu_ids: Sequence[int]) -> CopyHandle:
        self._stored.extend(i for i in cpu_ids if i not in self._stored)
        return self._inner.store(gpu_ids, cpu_ids)

    def _wrong(self, cpu_ids: Sequence[int]) -> list[int]:
        mine = set(cpu_ids)
        others = [i for i in self._stored if i not in mine]
        if not others:
            raise ValueError("faulty_offload: no other prompt's blocks stored to load instead")
        return [others[j % len(others)] for j in range(len(cpu_ids))]

    def load(self, cpu_ids: Sequence[int], gpu_ids: Sequence[int]) -> CopyHandle:
        return self._inner.load(self._wrong(cpu_ids), gpu_ids)

    def load_layers(
        self, cpu_ids: Sequence[int], gpu_ids: Sequence[int], chunks: Sequence[tuple[int, int]]
    ) -> list[CopyHandle]:
        return self._inner.load_layers(self._wrong(cpu_ids), gpu_ids, chunks)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class MisloadingOffloadWorker(CPUOffloadWorker):
    """CPUOffloadWorker whose loads put another prompt's blocks where the hit's belong."""

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        super().register_kv_caches(kv_caches)
        self.backend = _OtherPromptLoads(self.backend)  # type: ignore[assignment]


class MisloadingCPUOffloadConnector(SimpleCPUOffloadConnector):
    """SimpleCPUOffloadConnector with ``MisloadingOffloadWorker``."""

    worker_cls = MisloadingOffloadWorker
