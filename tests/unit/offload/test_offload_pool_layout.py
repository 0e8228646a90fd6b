"""The CPU tier's pool is block-major: one CPU block holds every layer slot of it, contiguously."""

from __future__ import annotations

from offload_helpers import config, hybrid_spec, kv_caches, spec

from kvbridge.offload.worker import CPUOffloadWorker


def test_worker_allocates_a_block_major_pool() -> None:
    s = spec(num_layers=3)
    worker = CPUOffloadWorker(config(num_cpu_blocks=5), s)
    worker.register_kv_caches(kv_caches(s))
    assert worker.backend is not None
    cpu = worker.backend.cpu_layers
    block = 2 * s.block_size * s.num_kv_heads * s.head_dim  # elements of one block-layer
    assert [t.shape[0] for t in cpu] == [5, 5, 5]
    assert [t.stride(0) for t in cpu] == [3 * block] * 3  # block b of every layer together
    base, size = cpu[0].data_ptr(), cpu[0].element_size()
    assert [(t.data_ptr() - base) // size for t in cpu] == [0, block, 2 * block]
    worker.shutdown()


def test_hybrid_groups_share_the_first_layer_slots_of_each_block() -> None:
    s = hybrid_spec()
    worker = CPUOffloadWorker(config(num_cpu_blocks=4), s)
    worker.register_kv_caches(kv_caches(s))
    full, swa = worker.backends
    assert len(full.cpu_layers) == 2 and len(swa.cpu_layers) == 1
    assert swa.cpu_layers[0].data_ptr() == full.cpu_layers[0].data_ptr()
    assert (
        full.cpu_layers[0].stride(0)
        == swa.cpu_layers[0].stride(0)
        == 2 * full.cpu_layers[0][0].numel()
    )
    worker.shutdown()
