"""The KV tensors a NIXL worker registers: checked against the cache spec, described as regions."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from kvbridge.config import ConfigError
from kvbridge.connector.layout import block_rows
from kvbridge.connector.types import KVCacheSpec
from kvbridge.nixl.handshake import NixlAgentMetadata
from kvbridge.nixl.lease_board import LeaseBoardInfo
from kvbridge.nixl.transfers import KVRegions

if TYPE_CHECKING:
    import torch


class KVLayers(NamedTuple):
    """The engine's KV tensors in registration order, and which of them each group uses."""

    names: tuple[str, ...]
    tensors: list[torch.Tensor]  # ``[num_blocks, block_elems]`` rows of each layer's memory
    group_layers: list[list[int]]  # per KV cache group, indices into ``names``


def check_kv_caches(spec: KVCacheSpec, kv_caches: dict[str, torch.Tensor]) -> KVLayers:
    """Every layer of the spec as block rows, all on one device; ConfigError otherwise."""
    names = list(dict.fromkeys(n for g in spec.groups for n in g.layer_names))
    missing = sorted(set(names) - set(kv_caches))
    extra = sorted(set(kv_caches) - set(names))
    if missing or extra:
        raise ConfigError(
            f"kv_caches: layers {missing or extra} "
            f"{'missing' if missing else 'not in the cache spec'}"
        )
    tensors = [block_rows(spec, n, kv_caches[n]) for n in names]
    for name, t in zip(names, tensors):
        if t.device != tensors[0].device or t.stride(0) != tensors[0].stride(0):
            raise ConfigError(
                f"kv_caches[{name!r}]: every layer must be on {tensors[0].device} with the same "
                "block stride"
            )
    groups = [[names.index(n) for n in g.layer_names] for g in spec.groups]
    return KVLayers(tuple(names), tensors, groups)


def cache_regions(spec: KVCacheSpec, layers: KVLayers) -> KVRegions:
    """Where the KV cache's blocks live (GPU memory as "VRAM", CPU memory as "DRAM")."""
    first = layers.tensors[0]
    return KVRegions(
        layer_names=layers.names,
        base_addrs=tuple(t.data_ptr() for t in layers.tensors),
        block_len=spec.block_bytes_per_layer,
        block_stride=first.stride(0) * first.element_size(),
        num_blocks=spec.num_blocks,
        memory_type="VRAM" if first.device.type == "cuda" else "DRAM",
        device_id=first.device.index or 0,
    )


def agent_metadata(
    *,
    engine_id: str,
    rank: int,
    instance_id: str,
    agent_bytes: bytes,
    spec: KVCacheSpec,
    regions: KVRegions,
    kv_buffer_device: str,
    lease_duration_s: float = 0.0,
    lease_board: LeaseBoardInfo | None = None,
) -> NixlAgentMetadata:
    """What a producer serves on its side channel: its agent and the regions it registered."""
    return NixlAgentMetadata(
        engine_id=engine_id,
        tp_rank=rank,
        agent_metadata=agent_bytes,
        layer_names=list(regions.layer_names),
        kv_base_addrs=list(regions.base_addrs),
        block_len=regions.block_len,
        block_stride=regions.block_stride,
        block_size=spec.block_size,
        layout=spec.layout.value,
        num_blocks=regions.num_blocks,
        dtype=spec.dtype,
        num_layers=spec.num_layers,
        memory_type=regions.memory_type,
        device_id=regions.device_id,
        kv_buffer_device=kv_buffer_device,
        instance_id=instance_id,
        kv_lease_duration_s=lease_duration_s,
        lease_board=lease_board,
    )
