"""TransferConfig validation and the connector factory."""

from __future__ import annotations

import json

import pytest
from multi_helpers import spec

from kvbridge.config import ConfigError, TransferConfig
from kvbridge.connector.base import KVConnectorRole
from kvbridge.connector.factory import create_connector, register_connector
from kvbridge.connector.noop import NoOpScheduler, NoOpWorker

VLLM_JSON = json.dumps(
    {
        "kv_connector": "MultiConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "connectors": [
                {"kv_connector": "NoOpConnector", "kv_role": "kv_both"},
                {"kv_connector": "NoOpConnector", "kv_role": "kv_both"},
            ]
        },
        "kv_buffer_device": "cuda",
        "kv_rank": None,
        "kv_parallel_size": 1,
    }
)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"kv_connector": "NoOpConnector", "kv_role": "leader"}, "kv_role"),
        ({"kv_connector": ""}, "kv_connector"),
        ({"kv_role": "kv_both"}, "kv_connector"),
        ({"kv_connector": "X", "kv_connector_extra_config": [1]}, "kv_connector_extra_config"),
        ({"kv_connector": "X", "kv_load_failure_policy": "ignore"}, "kv_load_failure_policy"),
        ({"kv_connector": "X", "kv_conector_extra_config": {}}, "kv_conector_extra_config"),
        ({"kv_connector": "X", "kv_buffer_device": "tpu"}, "kv_buffer_device"),
    ],
)
def test_invalid_config_names_the_key(data: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}:"):
        TransferConfig.from_dict(data)


def test_vllm_json_is_accepted_verbatim() -> None:
    config = TransferConfig.from_json(VLLM_JSON)
    assert config.kv_connector == "MultiConnector"
    assert len(config.kv_connector_extra_config["connectors"]) == 2
    assert isinstance(create_connector(config, KVConnectorRole.SCHEDULER, spec()), object)


def test_invalid_json_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="invalid JSON"):
        TransferConfig.from_json("{nope")


def test_renamed_key_keeps_working_with_deprecation_warning() -> None:
    with pytest.warns(DeprecationWarning, match="kv_connector_extra_configs"):
        config = TransferConfig.from_dict(
            {"kv_connector": "NoOpConnector", "kv_connector_extra_configs": {"a": 1}}
        )
    assert config.kv_connector_extra_config == {"a": 1}


def test_unknown_connector_lists_registered_names() -> None:
    config = TransferConfig(kv_connector="Nope")
    with pytest.raises(ConfigError, match="unknown connector 'Nope'.*NixlConnector"):
        create_connector(config, KVConnectorRole.SCHEDULER, spec())


def test_factory_builds_each_role() -> None:
    config = TransferConfig(kv_connector="NoOpConnector")
    assert isinstance(create_connector(config, KVConnectorRole.SCHEDULER, spec()), NoOpScheduler)
    assert isinstance(create_connector(config, KVConnectorRole.WORKER, spec()), NoOpWorker)


def test_module_path_loads_only_a_connector_class() -> None:
    ok = TransferConfig(kv_connector="Recording", kv_connector_module_path="support.recording")
    assert create_connector(ok, KVConnectorRole.SCHEDULER, spec()) is not None
    not_a_connector = TransferConfig(
        kv_connector="INSTANCES", kv_connector_module_path="support.recording"
    )
    with pytest.raises(ConfigError, match="not a kvbridge connector"):
        create_connector(not_a_connector, KVConnectorRole.SCHEDULER, spec())
    missing = TransferConfig(kv_connector="X", kv_connector_module_path="no.such.module")
    with pytest.raises(ConfigError, match="cannot import 'no.such.module'"):
        create_connector(missing, KVConnectorRole.SCHEDULER, spec())


def test_non_hma_connector_refuses_hybrid_cache() -> None:
    config = TransferConfig(kv_connector="Recording", kv_connector_module_path="support.recording")
    with pytest.raises(ConfigError, match="does not support hybrid KV caches"):
        create_connector(config, KVConnectorRole.SCHEDULER, spec(num_groups=2))


def test_register_connector_refuses_a_conflicting_name() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_connector("NoOpConnector", "elsewhere:Other")
    with pytest.raises(ValueError, match="ClassName"):
        register_connector("Fresh", "no_colon")


def test_child_inherits_engine_id_unless_set() -> None:
    parent = TransferConfig(kv_connector="MultiConnector", engine_id="E1")
    child = TransferConfig.from_dict({"kv_connector": "NoOpConnector"}, parent=parent)
    assert child.engine_id == "E1"
    own = TransferConfig.from_dict(
        {"kv_connector": "NoOpConnector", "engine_id": "E2"}, parent=parent
    )
    assert own.engine_id == "E2"
