"""Copy planning, the backend registry and the CPU copy backend on real tensors."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

from kvbridge.bench.offload import main as bench_main
from kvbridge.copy.backend import copy_backend_class, plan_runs
from kvbridge.copy.cpu import CPUCopyBackend
from kvbridge.copy.staged import chunk_runs, staged_load, staged_store


def test_plan_runs_sorts_by_key_and_splits_runs() -> None:
    plan = plan_runs([7, 3, 4, 8, 0], [70, 30, 40, 80, 0])
    assert plan.keyed == [0, 3, 4, 7, 8]
    assert plan.other == [0, 30, 40, 70, 80]
    assert plan.runs == [(0, 1), (1, 2), (3, 2)]
    assert plan_runs([], []).runs == []
    with pytest.raises(ValueError, match="2 keyed ids but 1"):
        plan_runs([1, 2], [1])


def test_registry_resolves_cpu_and_rejects_unknown() -> None:
    assert copy_backend_class("cpu", user="T") is CPUCopyBackend
    with pytest.raises(ValueError, match="^T: no copy backend for KV caches on 'meta'; supported"):
        copy_backend_class("meta", user="T")


def _layers(num_blocks: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(num_blocks, 2, 4, 2, 8, generator=gen) for _ in range(3)]


def test_cpu_backend_round_trip_with_scattered_and_consecutive_ids() -> None:
    gpu = _layers(12, seed=1)
    cpu = CPUCopyBackend.allocate_cpu_layers(gpu, 6)
    assert [t.shape for t in cpu] == [torch.Size([6, 2, 4, 2, 8])] * 3
    backend = CPUCopyBackend(gpu, cpu)
    src = [9, 2, 3, 11, 0]
    dst = [4, 0, 1, 5, 2]
    assert backend.store(src, dst).done()
    for g, c in zip(gpu, cpu):
        for s, d in zip(src, dst):
            assert torch.equal(c[d], g[s])
    original = [g.clone() for g in gpu]
    targets = [7, 8, 1, 10, 6]
    backend.load(dst, targets).wait()
    for g, o in zip(gpu, original):
        for s, t in zip(src, targets):
            assert torch.equal(g[t], o[s])
        untouched = [b for b in range(12) if b not in targets]
        assert torch.equal(g[untouched], o[untouched])


def test_cpu_backend_copies_few_ops_per_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = _layers(64, seed=2)
    backend = CPUCopyBackend(gpu, CPUCopyBackend.allocate_cpu_layers(gpu, 32))
    calls = []
    real = torch.index_select

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "index_select", counting)
    backend.store(list(range(40, 64)), list(range(0, 24)))  # one run of 24 blocks
    assert len(calls) == len(gpu)


def test_chunk_runs_clip_runs_to_chunks() -> None:
    plan = plan_runs([0, 1, 2, 3, 4, 9, 10], list(range(7)))
    assert list(chunk_runs(plan, 3)) == [
        (0, 3, [(0, 3)]),
        (3, 6, [(3, 2), (5, 1)]),
        (6, 7, [(6, 1)]),
    ]
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        list(chunk_runs(plan, 0))


def test_staged_copy_sequences_round_trip_in_small_chunks() -> None:
    # The CUDA backend's gather/stage/copy arithmetic, run on CPU tensors.
    gpu = _layers(16, seed=4)
    cpu = CPUCopyBackend.allocate_cpu_layers(gpu, 10)
    src, slots = [15, 2, 7, 3, 11, 0, 9], [8, 0, 1, 2, 5, 6, 9]
    plan = plan_runs(slots, src)
    staging = torch.empty(len(gpu), 3, *gpu[0].shape[1:])
    staged_store(gpu, cpu, plan, torch.tensor(plan.other), staging)
    for g, c in zip(gpu, cpu):
        assert all(torch.equal(c[d], g[s]) for s, d in zip(src, slots))
    original = [g.clone() for g in gpu]
    targets = [1, 4, 5, 6, 8, 10, 12]
    back = plan_runs(slots, targets)
    staged_load(gpu, cpu, back, torch.tensor(back.other), staging)
    for g, o in zip(gpu, original):
        assert all(torch.equal(g[t], o[s]) for s, t in zip(src, targets))
        kept = [b for b in range(16) if b not in targets]
        assert torch.equal(g[kept], o[kept])


def test_bench_offload_runs_and_checks_correctness(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main(["--device", "cpu", "--layers", "2", "--blocks", "16", "--iters", "1"]) == 0
    out = capsys.readouterr().out
    for order in ("consecutive", "scattered"):  # fragmented and concurrent rows by default
        for direction in ("store ", "load ", r"store\+load"):
            assert re.search(rf"{order}\s*│ -\s*│ {direction}.*PASS", out), (order, direction)
