"""Offload config parsing and CPU pool sizing: every error names its key."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest
from offload_helpers import config, spec

from kvbridge.config import ConfigError
from kvbridge.connector.base import KVConnectorRole
from kvbridge.connector.factory import create_connector
from kvbridge.connector.types import KVCacheGroupSpec, KVCacheLayout
from kvbridge.offload.config import (
    check_offload_extra,
    derive_cpu_config,
    parse_offload_config,
    warn_if_churning,
)
from kvbridge.offload.scheduler import CPUOffloadScheduler


def test_cpu_blocks_scale_with_bytes_and_split_by_world_size() -> None:
    s = spec(num_blocks=16)
    gpu_bytes = s.num_blocks * s.block_bytes
    assert derive_cpu_config(s, cpu_bytes_to_use=2 * gpu_bytes).num_cpu_blocks == 32
    s2 = spec(num_blocks=16, world_size=4)
    size = derive_cpu_config(s2, cpu_bytes_to_use=2 * gpu_bytes)
    assert size.num_cpu_blocks == 8 and size.total_bytes == 8 * s.block_bytes


def test_explicit_num_cpu_blocks_must_fit_capacity() -> None:
    s = spec(num_blocks=16)
    cap = 3 * s.block_bytes
    assert derive_cpu_config(s, cpu_bytes_to_use=cap, num_cpu_blocks=2).num_cpu_blocks == 2
    for bad in (0, 4):
        with pytest.raises(ConfigError, match=r"num_cpu_blocks: .* outside 1\.\.3"):
            derive_cpu_config(s, cpu_bytes_to_use=cap, num_cpu_blocks=bad)
    with pytest.raises(ConfigError, match="num_cpu_blocks"):
        derive_cpu_config(s, num_cpu_blocks=11, host_bytes=10 * s.block_bytes)


def test_pool_sizing_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="cpu_bytes_to_use: must be a finite number > 0"):
        check_offload_extra(config(cpu_bytes_to_use=-1))
    with pytest.raises(ConfigError, match="cpu_bytes_to_use_per_rank: must be a finite"):
        check_offload_extra(config(cpu_bytes_to_use_per_rank=0))
    for bad in (float("inf"), float("nan")):  # JSON's Infinity / NaN (was: int() raised)
        with pytest.raises(ConfigError, match="cpu_bytes_to_use: must be a finite"):
            check_offload_extra(config(cpu_bytes_to_use=bad))


def test_default_is_vllms_8_gib_split_by_world_size() -> None:
    s = spec(num_blocks=16, world_size=4)
    size = derive_cpu_config(s)
    assert size.num_cpu_blocks == (8 << 30) // 4 // s.block_bytes
    parsed = parse_offload_config(config(num_cpu_blocks=None), s)
    assert parsed.num_cpu_blocks == size.num_cpu_blocks
    assert not parsed.lazy_offload and parsed.warnings == ()


def test_bytes_below_one_block_give_one_block_as_in_vllm(caplog: pytest.LogCaptureFixture) -> None:
    s = spec()
    size = derive_cpu_config(s, cpu_bytes_to_use=s.block_bytes - 1)
    assert (size.num_cpu_blocks, size.clamped) == (1, True)
    with caplog.at_level(logging.WARNING, logger="kvbridge.offload.config"):
        CPUOffloadScheduler(config(num_cpu_blocks=None, cpu_bytes_to_use=1), s)
    assert "hold no block" in caplog.text


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ({"cpu_bytes_to_use_per_rnk": 10}, "cpu_bytes_to_use_per_rnk: unknown key"),
        ({"lazy_ofload": True}, "lazy_ofload: unknown key"),
        ({"lazy_offload": 1}, "lazy_offload: expected bool"),
        ({"lazy_offload_min_prefix_tokens": 1.5}, "lazy_offload_min_prefix_tokens: expected int"),
        ({"lazy_offload_min_prefix_tokens": -1}, "lazy_offload_min_prefix_tokens: must be >= 0"),
        ({"cpu_bytes_to_use_per_rank": "1G"}, "cpu_bytes_to_use_per_rank: expected int/float"),
        ({"kv_offload_backend": "nvme"}, "kv_offload_backend: 'nvme' is not one of"),
        ({"kv_offload_backend": "disk"}, "disk_path: kv_offload_backend 'disk' needs"),
        ({"block_size": 16}, "block_size: 16 differs"),
        ({"cpu_byte_to_use": 10}, "cpu_byte_to_use: unknown key"),
        ({"num_cpu_blocks": True}, "num_cpu_blocks: expected a number"),
        ({"store_decode_blocks": "yes"}, "store_decode_blocks: expected bool"),
    ],
)
def test_bad_extra_config_names_the_key(extra: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        parse_offload_config(config(**extra), spec())


def test_parse_accepts_vllm_keys() -> None:
    s = spec()
    parsed = parse_offload_config(
        config(cpu_bytes_to_use=1e6, num_cpu_blocks=None, lazy_offload=False, block_size=4), s
    )
    assert parsed.num_cpu_blocks == int(1e6) // s.block_bytes
    assert not parsed.store_decode_blocks


def test_small_pool_warns_that_it_churns(caplog: pytest.LogCaptureFixture) -> None:
    s = spec(num_blocks=16)
    with caplog.at_level(logging.WARNING, logger="kvbridge.offload.config"):
        CPUOffloadScheduler(config(num_cpu_blocks=8), s)
    assert "mostly churns" in caplog.text
    assert not warn_if_churning(parse_offload_config(config(num_cpu_blocks=16), s), s)


def test_factory_refuses_kv_first_layout_and_groups_it_cannot_store() -> None:
    with pytest.raises(ConfigError, match="moves each block of a layer as one region"):
        create_connector(config(), KVConnectorRole.SCHEDULER, spec(layout=KVCacheLayout.KV_FIRST))
    hybrid = (
        KVCacheGroupSpec("full", ("layers.0",)),
        KVCacheGroupSpec("swa", ("layers.1",), "sliding_window", 8),
    )
    create_connector(config(), KVConnectorRole.SCHEDULER, spec(groups=hybrid)).shutdown()
    for bad, key in (
        (KVCacheGroupSpec("ssm", ("layers.1",), "mamba"), r"groups\[1\]\.attention: 'mamba'"),
        (KVCacheGroupSpec("swa", ("layers.1",), "sliding_window"), r"groups\[1\]\.sliding_window"),
    ):
        with pytest.raises(ConfigError, match=key):
            create_connector(config(), KVConnectorRole.SCHEDULER, spec(groups=(hybrid[0], bad)))


def test_scheduler_half_imports_and_builds_without_torch() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None
        from kvbridge.config import TransferConfig
        from kvbridge.connector.base import KVConnectorRole
        from kvbridge.connector.factory import create_connector
        from kvbridge.connector.types import KVCacheSpec
        import kvbridge.offload.config, kvbridge.offload.pool, kvbridge.offload.metadata
        import kvbridge.offload.scheduler, kvbridge.copy.backend, kvbridge.offload.connector
        cfg = TransferConfig(
            kv_connector="SimpleCPUOffloadConnector",
            kv_connector_extra_config={"num_cpu_blocks": 4},
        )
        spec = KVCacheSpec(block_size=4, num_blocks=4, num_layers=1, num_kv_heads=1,
                           head_dim=4, dtype="bfloat16")
        half = create_connector(cfg, KVConnectorRole.SCHEDULER, spec)
        print(type(half).__name__, "torch" in sys.modules and sys.modules["torch"] is not None)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["CPUOffloadScheduler", "False"]


def test_copy_strategy_is_validated_and_kept() -> None:
    ok = config(copy_strategy="direct/pipelined")
    assert parse_offload_config(ok, spec()).copy_strategy == "direct/pipelined"
    with pytest.raises(ConfigError, match=r"copy_strategy: 'fastest'"):
        parse_offload_config(config(copy_strategy="fastest"), spec())


# -- vLLM's keys, vLLM's meaning --------------------------------------------------------------
def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_per_rank_bytes_override_the_share_and_warn_when_they_differ(
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = spec(num_blocks=16, world_size=2)
    share = 40 * s.block_bytes
    agreeing = config(
        num_cpu_blocks=None, cpu_bytes_to_use=2 * share, cpu_bytes_to_use_per_rank=share
    )
    assert parse_offload_config(agreeing, s).warnings == ()
    per_rank = 24 * s.block_bytes
    cfg = config(
        num_cpu_blocks=None, cpu_bytes_to_use=2 * share, cpu_bytes_to_use_per_rank=per_rank
    )
    with caplog.at_level(logging.WARNING, logger="kvbridge.offload.config"):
        sched = CPUOffloadScheduler(cfg, s)
    assert sched.offload.num_cpu_blocks == 24  # the per-rank value, not the share of 40
    (message,) = [m for m in _warnings(caplog) if "per_rank" in m]
    assert "!= cpu_bytes_to_use/world_size" in message
    # Without cpu_bytes_to_use the share is vLLM's default 8 GiB / world size.
    alone = parse_offload_config(config(num_cpu_blocks=None, cpu_bytes_to_use_per_rank=per_rank), s)
    assert alone.num_cpu_blocks == 24 and len(alone.warnings) == 1


def test_lazy_offload_is_accepted_with_one_startup_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = spec(num_blocks=8)
    cfg = config(lazy_offload=True, lazy_offload_min_prefix_tokens=64)
    with caplog.at_level(logging.WARNING, logger="kvbridge.offload.config"):
        sched = create_connector(cfg, KVConnectorRole.SCHEDULER, s)
        create_connector(cfg, KVConnectorRole.WORKER, s).shutdown()  # workers stay quiet
    assert isinstance(sched, CPUOffloadScheduler)
    assert sched.offload.lazy_offload and sched.offload.lazy_offload_min_prefix_tokens == 64
    (message,) = _warnings(caplog)
    assert "lazy_offload" in message and "stores eagerly" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kvbridge.offload.config"):
        create_connector(config(lazy_offload=False), KVConnectorRole.SCHEDULER, s)
    assert _warnings(caplog) == []


def test_min_prefix_tokens_and_cpu_backend_are_accepted_without_lazy() -> None:
    parsed = parse_offload_config(
        config(lazy_offload_min_prefix_tokens=0, kv_offload_backend="cpu"), spec()
    )
    assert parsed.lazy_offload_min_prefix_tokens == 0 and parsed.warnings == ()
