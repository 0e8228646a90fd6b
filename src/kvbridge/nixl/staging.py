"""HostStaging: the host buffer of ``kv_buffer_device: "cpu"`` and the copies through it.

The buffer mirrors the KV cache block for block (per layer ``[num_blocks, 2, block_size,
kv_heads, head_dim]``, pinned when the cache is on CUDA), so cache block ``b`` stages through
host block ``b`` and NIXL moves host memory only::

    producer cache --stage_out--> host ==READ (DRAM->DRAM)==> host --stage_in--> cache consumer

Host block ``b`` belongs to whoever owns cache block ``b``: a held producer request (its lease
starts once ``stage_out`` finished) or a loading consumer request. The copies are the batched
ones of ``kvbridge.copy`` (shared with the CPU tier), one engine per KV cache group over
that group's layers, so a group's block ids never touch another group's layers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvbridge.copy.backend import AllDone, CopyBackend, CopyHandle, copy_backend_class
from kvbridge.nixl.transfers import KVRegions

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


class HostStaging:
    """Runs in a worker; owns the host mirror of the KV cache and the copy engines into it."""

    def __init__(
        self, kv_layers: Sequence[torch.Tensor], group_layers: Sequence[Sequence[int]]
    ) -> None:
        if not kv_layers:
            raise ValueError("HostStaging: no KV cache layers")
        first = kv_layers[0]
        cls = copy_backend_class(first.device.type, user="NixlConnector (kv_buffer_device: cpu)")
        self.host_layers: list[torch.Tensor] = cls.allocate_cpu_layers(kv_layers, first.shape[0])
        self._engines: list[CopyBackend] = [
            cls([kv_layers[i] for i in layers], [self.host_layers[i] for i in layers])
            for layers in group_layers
        ]
        self.nbytes = sum(t.numel() * t.element_size() for t in self.host_layers)
        logger.info(
            "host staging buffer: %d layers x %d blocks, %.1f MiB%s",
            len(self.host_layers),
            first.shape[0],
            self.nbytes / 2**20,
            " (pinned)" if self.host_layers[0].is_pinned() else "",
        )

    def regions(self, layer_names: Sequence[str], block_len: int) -> KVRegions:
        """Where the host blocks live, to register with NIXL and advertise to consumers."""
        host = self.host_layers[0]
        return KVRegions(
            layer_names=tuple(layer_names),
            base_addrs=tuple(t.data_ptr() for t in self.host_layers),
            block_len=block_len,
            block_stride=host.stride(0) * host.element_size(),
            num_blocks=host.shape[0],
            memory_type="DRAM",
            device_id=0,
        )

    def stage_out(self, block_ids: Sequence[Sequence[int]]) -> CopyHandle:
        """Copy cache blocks ``block_ids[g]`` of each group ``g`` to the same host blocks."""
        return self._copy(block_ids, out=True)

    def stage_in(self, block_ids: Sequence[Sequence[int]]) -> CopyHandle:
        """Copy host blocks ``block_ids[g]`` of each group ``g`` into the same cache blocks."""
        return self._copy(block_ids, out=False)

    def _copy(self, block_ids: Sequence[Sequence[int]], *, out: bool) -> CopyHandle:
        if len(block_ids) != len(self._engines):
            raise ValueError(
                f"HostStaging: {len(block_ids)} lists of block ids for {len(self._engines)} groups"
            )
        handles = []
        for engine, ids in zip(self._engines, block_ids):
            unique = sorted(set(ids))
            if unique:
                copy = engine.store if out else engine.load
                handles.append(copy(unique, unique))
        return AllDone(handles)

    def shutdown(self) -> None:
        for engine in self._engines:
            engine.shutdown()
