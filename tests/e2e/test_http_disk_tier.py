"""``kvbridge serve`` with the disk tier: a prompt evicted from GPU and CPU comes back from disk
with the monolithic engine's tokens, a restarted server serves it from disk, and ``/metrics``
shows the disk series (vLLM-style names under ``kvbridge:``)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from e2e.http_fixtures import RunningServer, metric_value, reference_tokens, running_server
from kvbridge.config import TransferConfig

pytestmark = pytest.mark.e2e


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 256) for _ in range(n)]


A = prompt(30, seed=1)
FILLERS = [prompt(30, seed=10 + i) for i in range(3)]


def serve(path: Path) -> dict[str, object]:
    extra = {
        "num_cpu_blocks": 12,
        "kv_offload_backend": "disk",
        "disk_path": str(path),
        "disk_capacity_bytes": 1 << 30,
    }
    config = TransferConfig(
        kv_connector="SimpleCPUOffloadConnector", kv_connector_extra_config=extra
    )
    return {"block_size": 4, "num_gpu_blocks": 12, "kv_transfer_config": config}


def ask(server: RunningServer, tokens: list[int]) -> list[int]:
    r = server.complete(prompt=tokens, max_tokens=4, temperature=0, ignore_eos=True)
    assert r.status_code == 200, r.text
    return list(r.json()["choices"][0]["token_ids"])


def wait_for(server: RunningServer, sample: str, at_least: float, **labels: str) -> str:
    """The /metrics text once ``sample`` reaches ``at_least`` (the disk writes end later)."""
    deadline = time.monotonic() + 30
    while True:
        text = server.metrics()
        if (metric_value(text, sample, **labels) or 0) >= at_least:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{sample} stayed below {at_least}:\n{text}")
        time.sleep(0.05)


def test_disk_tier_serves_evicted_prefix_and_restarts_with_metrics(tmp_path: Path) -> None:
    want = reference_tokens([A], max_tokens=4)[0]
    label = {"connector": "SimpleCPUOffloadConnector"}
    with running_server(**serve(tmp_path)) as server:
        assert ask(server, A) == want
        wait_for(server, "kvbridge:kv_offload_disk_blocks", 7, **label)
        for f in FILLERS:
            ask(server, f)
        assert ask(server, A) == want
        text = wait_for(server, "kvbridge:kv_offload_disk_hits_total", 7, **label)
        by_source = "kvbridge:prompt_tokens_by_source_total"
        assert (metric_value(text, by_source, source="cpu_tier") or 0) >= 28
        moved = "kvbridge:kv_offload_total_bytes_total"
        assert (metric_value(text, moved, transfer_type="cpu_to_disk") or 0) > 0
        assert (metric_value(text, moved, transfer_type="disk_to_cpu") or 0) > 0
        spent = "kvbridge:kv_offload_total_time_total"
        assert (metric_value(text, spent, transfer_type="disk_to_cpu") or 0) > 0
        assert metric_value(text, "kvbridge:kv_offload_disk_corrupt_records_total", **label) in (
            None,
            0,
        )
    with running_server(**serve(tmp_path)) as restarted:
        assert (metric_value(restarted.metrics(), "kvbridge:kv_offload_disk_blocks", **label)) == (
            4 * 7
        )  # A and the three fillers, 7 blocks each, found by the start-up scan
        assert ask(restarted, A) == want
        wait_for(restarted, "kvbridge:kv_offload_disk_hits_total", 7, **label)
