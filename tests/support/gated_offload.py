"""A CPU tier whose loads finish only once the test opens a gate: a load held in flight.

Built through kvbridge's public extension point (a connector class named by
``kv_connector_module_path``). The copies themselves run as usual; only their completion is
reported late, so the scheduler keeps the loaded CPU blocks pinned until ``OPEN`` is set.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kvbridge.copy.backend import CopyHandle
from kvbridge.offload.connector import SimpleCPUOffloadConnector
from kvbridge.offload.worker import CPUOffloadWorker

if TYPE_CHECKING:
    import torch

OPEN = threading.Event()  # cleared: every load stays in flight
OPEN.set()
WAIT_LIMIT_S = 30.0  # shutdown waits for a gated load at most this long


class _GatedHandle(CopyHandle):
    def __init__(self, inner: CopyHandle) -> None:
        self._inner = inner

    def done(self) -> bool:
        return OPEN.is_set() and self._inner.done()

    def wait(self) -> None:
        if not OPEN.wait(WAIT_LIMIT_S):
            raise TimeoutError(f"gated_offload: the gate stayed shut for {WAIT_LIMIT_S}s")
        self._inner.wait()


class _GatedLoads:
    """Delegates to the real copy backend; a load's handle waits for the gate."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def load(self, cpu_ids: Sequence[int], gpu_ids: Sequence[int]) -> CopyHandle:
        return _GatedHandle(self._inner.load(cpu_ids, gpu_ids))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class GatedOffloadWorker(CPUOffloadWorker):
    """CPUOffloadWorker whose loads report done only while ``OPEN`` is set."""

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        super().register_kv_caches(kv_caches)
        self.backends = [_GatedLoads(b) for b in self.backends]  # type: ignore[misc]


class GatedCPUOffloadConnector(SimpleCPUOffloadConnector):
    """SimpleCPUOffloadConnector with ``GatedOffloadWorker``."""

    worker_cls = GatedOffloadWorker
