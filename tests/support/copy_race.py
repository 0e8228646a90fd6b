"""A race check for a copy backend's fence between the compute stream and its copy streams.

Each round the "compute stream" is kept busy (``delay``) and then writes the round's value into
the blocks about to be stored and a clobber value into the blocks about to be loaded (the
forward that wrote a stored block; the last user of a block a load overwrites). Then the round
stores those blocks and, at the same time, loads the blocks stored one round earlier into the
other cache blocks. With the fence every loaded block holds the previous round's value exactly;
a store that ran ahead copies the value of the round before, and a load that ran ahead is
clobbered: either shows as a corrupt block.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from kvbridge.copy.backend import CopyBackend

CLOBBER = -1.0


class RaceResult(NamedTuple):
    round_trips: int  # blocks stored and loaded back, all layers
    corrupt: int  # loaded blocks with any byte not the value stored


def value(round_no: int) -> float:
    """Round ``round_no``'s value: a small integer, exact in bf16."""
    return float(round_no % 200 + 1)


def race(
    backend: CopyBackend, *, rounds: int, blocks: int, delay: Callable[[], object]
) -> RaceResult:
    """Run ``rounds`` rounds of ``blocks`` stores and ``blocks`` loads at once; the cache needs
    ``2 * blocks`` blocks and the pool ``2 * blocks`` (scattered ids in both)."""
    gpu = backend.gpu_layers
    device = gpu[0].device
    gen = torch.Generator().manual_seed(7)
    cache = torch.randperm(2 * blocks, generator=gen).tolist()
    pool = torch.randperm(2 * blocks, generator=gen).tolist()
    store_ids, load_ids = cache[:blocks], cache[blocks:]
    cpu_sets = [sorted(pool[:blocks]), sorted(pool[blocks:])]
    stored, loaded = (torch.tensor(i, device=device) for i in (store_ids, load_ids))
    for layer in gpu:
        layer.index_fill_(0, stored, value(0))
    backend.store(store_ids, cpu_sets[0]).wait()
    corrupt = 0
    for r in range(1, rounds + 1):
        delay()
        for layer in gpu:
            layer.index_fill_(0, stored, value(r))
            layer.index_fill_(0, loaded, CLOBBER)
        store = backend.store(store_ids, cpu_sets[r % 2])
        load = backend.load(cpu_sets[(r - 1) % 2], load_ids)
        store.wait()
        load.wait()
        bad = torch.zeros(blocks, dtype=torch.bool, device=device)
        for layer in gpu:
            got = layer.index_select(0, loaded).reshape(blocks, -1)
            bad |= (got != value(r - 1)).any(dim=1)
        corrupt += int(bad.sum())
    return RaceResult(rounds * blocks, corrupt)
