"""A sample producer handshake answer (2 layers, 16 blocks of 256 bytes) for NIXL wire tests."""

from __future__ import annotations

from kvbridge.nixl.handshake import NixlAgentMetadata


def sample_agent_metadata(engine_id: str = "prefill") -> NixlAgentMetadata:
    return NixlAgentMetadata(
        engine_id=engine_id,
        tp_rank=0,
        agent_metadata=b"agent-bytes",
        layer_names=["layers.0", "layers.1"],
        kv_base_addrs=[4096, 8192],
        block_len=256,
        block_stride=256,
        block_size=4,
        layout="blocks_first",
        num_blocks=16,
        dtype="float32",
        num_layers=2,
        memory_type="DRAM",
        device_id=0,
        kv_buffer_device="cuda",
    )
