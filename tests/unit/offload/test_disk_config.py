"""The disk tier's keys (vLLM's names): parsed at parse time, every error naming key and fix."""

from __future__ import annotations

import pytest
from offload_helpers import config, spec

from kvbridge.config import ConfigError, TransferConfig
from kvbridge.connector.base import KVConnectorRole
from kvbridge.connector.factory import create_connector
from kvbridge.offload.config import parse_offload_config
from kvbridge.offload.disk.config import DEFAULT_THREADS, DiskConfig
from kvbridge.offload.disk.halves import TieredOffloadScheduler
from kvbridge.offload.scheduler import CPUOffloadScheduler

DISK = {"kv_offload_backend": "disk", "disk_path": "/tmp/kvb", "disk_capacity_bytes": 1 << 30}


def test_vllm_disk_config_is_accepted_as_vllm_writes_it() -> None:
    parsed = parse_offload_config(
        config(**DISK, disk_buffer_slots=2, use_page_cache=False, direct_io_alignment=512), spec()
    )
    assert parsed.disk == DiskConfig("/tmp/kvb", 1 << 30, direct=True, alignment=512)
    assert parsed.disk.n_read_threads == parsed.disk.n_write_threads == DEFAULT_THREADS
    buffered = parse_offload_config(config(**DISK, use_page_cache=True), spec()).disk
    assert buffered is not None and not buffered.direct
    assert parse_offload_config(config(kv_offload_backend="cpu"), spec()).disk is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({**DISK, "disk_path": ""}, "disk_path: kv_offload_backend 'disk' needs a directory"),
        ({**DISK, "disk_capacity_bytes": None}, "disk_capacity_bytes: .* positive byte budget"),
        ({**DISK, "disk_capacity_bytes": -1}, "disk_capacity_bytes: .* positive"),
        ({**DISK, "disk_capacity_bytes": float("inf")}, "disk_capacity_bytes: .* finite.*inf"),
        ({**DISK, "disk_capacity_bytes": float("nan")}, "disk_capacity_bytes: .* finite.*nan"),
        ({**DISK, "direct_io_alignment": 1000}, "direct_io_alignment: 1000 is not a power of two"),
        ({**DISK, "direct_io_alignment": 256}, "direct_io_alignment: 256"),
        ({**DISK, "n_read_threads": 0}, "n_read_threads: must be >= 1"),
        (
            {**DISK, "n_write_thread": 4},
            "n_write_thread: unknown key.*did you mean 'n_write_threads'",
        ),
        ({**DISK, "use_page_cache": "no"}, "use_page_cache: expected bool"),
        ({**DISK, "disk_recompute_guard": "off"}, "disk_recompute_guard: expected bool"),
        ({"kv_offload_backend": "ssd"}, "kv_offload_backend: 'ssd' is not one of cpu, disk"),
    ],
)
def test_bad_disk_config_fails_at_parse_time_naming_the_key(
    extra: dict[str, object], message: str
) -> None:
    raw = {"kv_connector": "SimpleCPUOffloadConnector", "kv_connector_extra_config": extra}
    with pytest.raises(ConfigError, match=f"kv_connector_extra_config.{message}"):
        TransferConfig.from_dict(raw)


def test_disk_keys_with_the_cpu_backend_are_ignored_with_a_warning_as_in_vllm() -> None:
    parsed = parse_offload_config(config(disk_path="/tmp/x", use_page_cache=True), spec())
    assert parsed.disk is None
    assert any("disk_path, use_page_cache ignored" in w for w in parsed.warnings)


def test_disk_tier_refuses_tensor_parallel_workers_and_a_budget_below_one_record() -> None:
    with pytest.raises(ConfigError, match="kv_offload_backend: the disk tier runs with one worker"):
        parse_offload_config(config(**DISK), spec(world_size=2))
    with pytest.raises(ConfigError, match="disk_capacity_bytes: 4096 bytes hold no block record"):
        parse_offload_config(config(**{**DISK, "disk_capacity_bytes": 4096}), spec())


def test_factory_builds_the_tiered_halves_only_with_the_disk_backend(tmp_path: object) -> None:
    extra = {**DISK, "disk_path": str(tmp_path), "num_cpu_blocks": 8}
    cfg = TransferConfig(kv_connector="SimpleCPUOffloadConnector", kv_connector_extra_config=extra)
    half = create_connector(cfg, KVConnectorRole.SCHEDULER, spec())
    assert isinstance(half, TieredOffloadScheduler)
    plain = TransferConfig(
        kv_connector="SimpleCPUOffloadConnector", kv_connector_extra_config={"num_cpu_blocks": 8}
    )
    half = create_connector(plain, KVConnectorRole.SCHEDULER, spec())
    assert type(half) is CPUOffloadScheduler
