"""``TransferConfig.from_dict``/``from_json`` check every connector's extra config at parse time.

A misspelled or bad key in a MultiConnector child fails there, naming its full path and the
fix, before any connector half is built.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from kvbridge.config import ConfigError, TransferConfig
from kvbridge.connector.base import KVConnectorRole
from kvbridge.connector.factory import create_connector
from kvbridge.connector.types import KVCacheSpec
from kvbridge.nixl.fake import FakeNixlWrapper
from kvbridge.nixl.worker import NixlWorker

CHILD = "kv_connector_extra_config.connectors"
SPEC = KVCacheSpec(
    block_size=4, num_blocks=8, num_layers=1, num_kv_heads=1, head_dim=4, dtype="float32"
)


def nixl(**extra: Any) -> dict[str, Any]:
    return {"kv_connector": "NixlConnector", "kv_connector_extra_config": extra}


def offload(**extra: Any) -> dict[str, Any]:
    extra.setdefault("num_cpu_blocks", 4)
    return {"kv_connector": "SimpleCPUOffloadConnector", "kv_connector_extra_config": extra}


def multi(*children: dict[str, Any]) -> dict[str, Any]:
    return {
        "kv_connector": "MultiConnector",
        "kv_connector_extra_config": {"connectors": list(children)},
    }


def test_a_misspelled_child_key_fails_at_parse_time_naming_the_path_and_the_fix() -> None:
    text = json.dumps(multi(nixl(), offload(cpu_bytes_to_usee=1 << 30)))
    with pytest.raises(ConfigError) as err:
        TransferConfig.from_json(text)
    message = str(err.value)
    assert message.startswith(
        f"{CHILD}[1].kv_connector_extra_config.cpu_bytes_to_usee: unknown key for "
        "SimpleCPUOffloadConnector; did you mean 'cpu_bytes_to_use'?"
    ), message


@pytest.mark.parametrize(
    ("data", "path", "why"),
    [
        (multi(nixl(kv_lease_duraton_s=5)), f"{CHILD}[0].kv_connector_extra_config."
         "kv_lease_duraton_s", "did you mean 'kv_lease_duration_s'"),
        (multi(nixl(), offload(num_cpu_blocks=0)), f"{CHILD}[1].kv_connector_extra_config."
         "num_cpu_blocks", "must be a finite number > 0"),
        (multi(offload(copy_strategy="fast")), f"{CHILD}[0].kv_connector_extra_config."
         "copy_strategy", "is not one of"),
        (multi(nixl(kv_lease_duration_s=-1)), f"{CHILD}[0].kv_connector_extra_config."
         "kv_lease_duration_s", "must be > 0"),
        (multi(nixl(), multi(offload(), offload(lazy_offload="yes"))),
         f"{CHILD}[1].{CHILD}[1].kv_connector_extra_config.lazy_offload", "expected bool"),
        (multi(nixl(), {"kv_connector": "NixlConector"}), f"{CHILD}[1].kv_connector",
         "unknown connector 'NixlConector'"),
        (nixl(side_channel_prot=1), "kv_connector_extra_config.side_channel_prot",
         "did you mean 'side_channel_port'"),
        ({"kv_connector": "NoOpConnector", "kv_connecter": "x"}, "kv_connecter",
         "did you mean 'kv_connector'"),
    ],
)  # fmt: skip
def test_bad_extra_config_fails_at_parse_time(data: dict[str, Any], path: str, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        TransferConfig.from_dict(data)
    assert str(err.value).startswith(f"{path}: "), err.value
    assert why in str(err.value)


def test_a_valid_tree_parses_and_builds() -> None:
    config = TransferConfig.from_dict(multi(nixl(nixl_wrapper="fake"), offload()))
    assert create_connector(config, KVConnectorRole.SCHEDULER, SPEC) is not None


# -- the fake NIXL's knobs from the config ------------------------------------------------------
def test_nixl_wrapper_fake_takes_its_knobs_from_fake_nixl() -> None:
    knobs = {"cycles_before_xfer_done": 3, "fail_next_xfers": 2, "fail_xfers_on_post": True}
    config = TransferConfig.from_dict(
        nixl(nixl_wrapper="fake", side_channel_port=0, fake_nixl=knobs)
    )
    worker = create_connector(config, KVConnectorRole.WORKER, SPEC)
    assert isinstance(worker, NixlWorker)
    fake = worker._factory("agent")
    assert isinstance(fake, FakeNixlWrapper)
    assert fake.cycles_before_xfer_done == 3
    assert fake._fail_next == ["post", "post"]
    worker.shutdown()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"fake_nixl": {"cycles_before_xfer_done": 1}}, "fake_nixl: .*set nixl_wrapper: 'fake'"),
        ({"nixl_wrapper": "fake", "fake_nixl": {"cycles_before_done": 1}},
         r"fake_nixl\.cycles_before_done: unknown key for FakeNixlWrapper; did you mean "
         r"'cycles_before_xfer_done'\?"),
        ({"nixl_wrapper": "fake", "fake_nixl": {"fail_next_xfers": -1}},
         r"fake_nixl\.fail_next_xfers: must be >= 0"),
        ({"nixl_wrapper": "fake", "fake_nixl": {"fail_xfers_on_post": 1}},
         r"fake_nixl\.fail_xfers_on_post: expected bool, got int"),
    ],
)  # fmt: skip
def test_fake_nixl_knobs_are_checked(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=rf"^kv_connector_extra_config\.{message}"):
        TransferConfig.from_dict(nixl(**extra))
