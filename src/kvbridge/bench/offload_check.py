"""The offload bench's block ids and its correctness check.

``churned_ids``: N cache blocks to store into N CPU blocks, N other cache blocks to load from
N other CPU blocks, in a cache and a pool of 2N blocks each. Consecutive: a fresh pool
(``0..N-1`` and ``N..2N-1``). Scattered: a pool that churned: every block was in use, an LRU
freed a random half, and the new blocks land there (ascending, as the pool hands out low ids
first), so runs of consecutive ids average two blocks.

``round_trip``: store random blocks, load them into poisoned cache blocks elsewhere, then store
and load at once (the concurrent path), and compare; a few stored blocks are also read back
from the pool itself.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kvbridge.copy.backend import CopyBackend

POISON = -7.0
SPOT_CHECKS = 4  # stored blocks compared in the pool itself


class Ids(NamedTuple):
    store: list[int]  # cache blocks stored
    cpu: list[int]  # CPU blocks they go to
    other_cpu: list[int]  # CPU blocks loaded (from an earlier store)
    load: list[int]  # cache blocks they come back to


def churned_ids(n: int, *, scattered: bool, seed: int = 0) -> Ids:
    """Ids of one transfer of ``n`` blocks in a cache and a pool of ``2 * n`` blocks each."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(2 * n, generator=gen).tolist()
    store, load = perm[:n], perm[n:]
    if scattered:
        freed = torch.randperm(2 * n, generator=gen).tolist()
        cpu, other = sorted(freed[:n]), sorted(freed[n:])
    else:
        cpu, other = list(range(n)), list(range(n, 2 * n))
    return Ids(store, cpu, other, load)


def _rows(layers: list[torch.Tensor], ids: list[int]) -> list[torch.Tensor]:
    index = torch.tensor(ids, device=layers[0].device)
    return [layer.index_select(0, index) for layer in layers]


def _poison(layers: list[torch.Tensor], ids: list[int]) -> None:
    index = torch.tensor(ids, device=layers[0].device)
    for layer in layers:
        layer.index_fill_(0, index, POISON)


def _equal(layers: list[torch.Tensor], ids: list[int], want: list[torch.Tensor]) -> bool:
    return all(torch.equal(got, w) for got, w in zip(_rows(layers, ids), want))


def round_trip(backend: CopyBackend, ids: Ids) -> str:
    """``PASS`` or ``FAIL:`` and the parts that went wrong."""
    gpu, cpu = backend.gpu_layers, backend.cpu_layers
    for layer in gpu:
        layer.normal_()
    want = _rows(gpu, ids.store)
    backend.store(ids.store, ids.other_cpu).wait()  # what the loads below read
    picks = range(0, len(ids.store), max(1, len(ids.store) // SPOT_CHECKS))
    in_pool = all(
        torch.equal(c[ids.other_cpu[i]].to(g.device), w[i])
        for c, g, w in zip(cpu, gpu, want)
        for i in picks
    )
    _poison(gpu, ids.load)
    backend.load(ids.other_cpu, ids.load).wait()
    loaded = _equal(gpu, ids.load, want)
    for layer in gpu:  # new data to store while the first comes back again
        layer.index_copy_(
            0, torch.tensor(ids.store, device=layer.device), torch.randn_like(want[0])
        )
    want2 = _rows(gpu, ids.store)
    _poison(gpu, ids.load)
    stored, again = backend.store_and_load(ids.store, ids.cpu, ids.other_cpu, ids.load)
    stored.wait()
    again.wait()
    both = _equal(gpu, ids.load, want) and _equal(gpu, ids.store, want2)
    _poison(gpu, ids.load)
    backend.load(ids.cpu, ids.load).wait()
    both = both and _equal(gpu, ids.load, want2)
    parts = (("pool", in_pool), ("load", loaded), ("store+load", both))
    failed = [name for name, ok in parts if not ok]
    return f"FAIL: {', '.join(failed)}" if failed else "PASS"
