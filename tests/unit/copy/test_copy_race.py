"""The fence between the compute stream and the copy streams, with a control without it.

On CPU the race driver itself is checked: a synchronous backend sees no corrupt block, and
one that stores the data of the round before (what a store running ahead of the forward
copies) is caught. On a GPU the CUDA backend runs the same driver with
the compute stream kept busy: with the fence no corrupt block, without it (the control) many.
"""

from __future__ import annotations

import pytest
import torch

from kvbridge.copy.backend import CopyHandle
from kvbridge.copy.cpu import CPUCopyBackend
from kvbridge.copy.cuda import CUDACopyBackend
from kvbridge.copy.triton_copier import HAVE_TRITON
from support.copy_race import race

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ROUNDS, BLOCKS = 100, 100  # 10,000 block round trips


def _layers(device: str, blocks: int, layers: int = 4) -> list[torch.Tensor]:
    if device == "cpu":  # small float32 blocks: CPU bf16 fills are slow
        return [torch.zeros((2 * blocks, 2, 4, 8)) for _ in range(layers)]
    shape = (2 * blocks, 2, 16, 2, 128)  # 16 KiB per block-layer
    return [torch.zeros(shape, dtype=torch.bfloat16, device=device) for _ in range(layers)]


class StaleStores(CPUCopyBackend):
    """Stores what the cache held before the last write: a store without its fence."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.before: list[torch.Tensor] | None = None

    def store(self, gpu_ids: list[int], cpu_ids: list[int]) -> CopyHandle:  # type: ignore[override]
        now = [layer.clone() for layer in self.gpu_layers]
        if self.before is not None:
            for layer, old in zip(self.gpu_layers, self.before):
                layer.copy_(old)
        handle = super().store(gpu_ids, cpu_ids)
        for layer, new in zip(self.gpu_layers, now):
            layer.copy_(new)
        self.before = now
        return handle


def test_race_driver_sees_no_corruption_from_a_synchronous_backend() -> None:
    gpu = _layers("cpu", 25, layers=2)
    backend = CPUCopyBackend(gpu, CPUCopyBackend.allocate_cpu_layers(gpu, 50, block_major=True))
    result = race(backend, rounds=50, blocks=20, delay=lambda: None)
    assert result == (1_000, 0)


def test_race_driver_catches_a_store_that_copies_stale_blocks() -> None:
    gpu = _layers("cpu", 10, layers=2)
    backend = StaleStores(gpu, CPUCopyBackend.allocate_cpu_layers(gpu, 20, block_major=True))
    result = race(backend, rounds=5, blocks=10, delay=lambda: None)
    assert result.corrupt == 4 * 10  # every round after the first loads a stale store


@needs_cuda
@pytest.mark.parametrize("strategy", ["pipelined", "direct", "auto"])
@pytest.mark.parametrize("fenced", [True, False], ids=["fence", "control"])
def test_cuda_fence_between_compute_and_copy_streams(
    strategy: str, fenced: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if strategy != "pipelined" and not HAVE_TRITON:
        pytest.skip("needs triton")
    gpu = _layers("cuda", BLOCKS)
    cpu = CUDACopyBackend.allocate_cpu_layers(gpu, 2 * BLOCKS, block_major=True)
    backend = CUDACopyBackend(gpu, cpu, copy_strategy=strategy)
    if not fenced:  # the control: the test build without the fence
        monkeypatch.setattr(backend, "_fence", lambda stream: None)
    # ~1 ms of a busy compute stream before it writes the blocks: far longer than the copies
    result = race(backend, rounds=ROUNDS, blocks=BLOCKS, delay=lambda: torch.cuda._sleep(2_000_000))
    backend.shutdown()
    print(f"race {strategy} {'fence' if fenced else 'control'}: {result}")
    assert result.round_trips >= 10_000
    if fenced:
        assert result.corrupt == 0
    else:
        assert result.corrupt > 0
