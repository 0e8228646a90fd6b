"""vLLM's configuration, read once into kvbridge's TransferConfig and KVCacheSpec."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvbridge.config import ConfigError, TransferConfig
from kvbridge.connector.types import KVCacheGroupSpec, KVCacheLayout, KVCacheSpec

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

# vLLM's KVCacheLayout name -> kvbridge's; the others split a block across memory.
_LAYOUTS = {
    "LBHNC": KVCacheLayout.VLLM_LBHNC,
    "LBNHC": KVCacheLayout.VLLM_LBNHC,
    "BLHNC": KVCacheLayout.VLLM_BLHNC,
    "BLNHC": KVCacheLayout.VLLM_BLNHC,
    "HND": KVCacheLayout.VLLM_LBHNC,  # vLLM's legacy aliases
    "NHD": KVCacheLayout.VLLM_LBNHC,
}
# The layout kvbridge asks vLLM for: layer-compact, one region per block and layer.
PREFERRED_LAYOUT = "LBHNC"
# kv-transfer-config keys kvbridge reads (the rest of vLLM's are vLLM's own business).
_PASSED_KEYS = (
    "kv_role",
    "engine_id",
    "kv_connector_extra_config",
    "kv_load_failure_policy",
    "kv_buffer_device",
    "kv_ip",
    "kv_port",
    "kv_rank",
    "kv_parallel_size",
)


def transfer_config(vllm_config: VllmConfig, kvbridge_connector: str) -> TransferConfig:
    """vLLM's ``--kv-transfer-config`` as kvbridge's, naming kvbridge's own connector."""
    kv = vllm_config.kv_transfer_config
    if kv is None:
        raise ConfigError("kv_transfer_config: vLLM started a kvbridge connector without one")
    values: dict[str, Any] = {"kv_connector": kvbridge_connector}
    for key in _PASSED_KEYS:
        value = getattr(kv, key, None)
        if value is not None:
            values[key] = value
    values["kv_connector_extra_config"] = dict(values.get("kv_connector_extra_config") or {})
    return TransferConfig.from_dict(values)


def cache_spec(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> KVCacheSpec:
    """The KV cache vLLM allocated, as kvbridge's ``KVCacheSpec`` (attention groups only)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    groups: list[KVCacheGroupSpec] = []
    shapes = set()
    for i, group in enumerate(kv_cache_config.kv_cache_groups):
        spec = group.kv_cache_spec
        if isinstance(spec, SlidingWindowSpec):
            attention, window = "sliding_window", int(spec.sliding_window)
        elif isinstance(spec, FullAttentionSpec) and type(spec) is FullAttentionSpec:
            attention, window = "full", None
        else:
            raise ConfigError(
                f"kv_cache_groups[{i}]: {type(spec).__name__} is not supported; kvbridge moves "
                "the KV of full and sliding-window attention layers"
            )
        shapes.add((spec.block_size, spec.num_kv_heads, spec.head_size, spec.dtype))
        name = f"{attention}{i}"
        groups.append(KVCacheGroupSpec(name, tuple(group.layer_names), attention, window))
    if len(shapes) != 1:
        raise ConfigError(
            f"kv_cache_groups: groups differ in (block_size, num_kv_heads, head_size, dtype) "
            f"{sorted(map(str, shapes))}; kvbridge needs one block geometry"
        )
    block_size, heads, head_dim, dtype = shapes.pop()
    hash_block_size = getattr(kv_cache_config, "hash_block_size", None)
    if hash_block_size not in (None, block_size):
        raise ConfigError(
            f"hash_block_size: {hash_block_size} differs from block_size {block_size}; "
            "kvbridge keys the CPU tier by one hash per block"
        )
    return KVCacheSpec(
        block_size=block_size,
        num_blocks=kv_cache_config.num_blocks,
        num_layers=sum(len(g.layer_names) for g in groups),
        num_kv_heads=heads,
        head_dim=head_dim,
        dtype=str(dtype).removeprefix("torch."),
        layout=_layout(vllm_config, kv_cache_config),
        groups=tuple(groups),
        model_name=str(vllm_config.model_config.model),
        world_size=vllm_config.parallel_config.world_size,
    )


def _layout(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> KVCacheLayout:
    name = kv_cache_config.kv_cache_layout or vllm_config.cache_config.kv_cache_layout
    if name is None:
        name = PREFERRED_LAYOUT  # not resolved yet (scheduler side): what kvbridge asked for
    if name not in _LAYOUTS:
        raise ConfigError(
            f"kv_cache_layout: {name} splits a block across memory; kvbridge moves one region "
            f"per block and layer ({', '.join(sorted(_LAYOUTS))}); set "
            f"VLLM_KV_CACHE_LAYOUT={PREFERRED_LAYOUT}"
        )
    return _LAYOUTS[name]
