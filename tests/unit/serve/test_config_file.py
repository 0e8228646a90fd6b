"""Config files (YAML/JSON) and flags for serve and proxy; errors name the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvbridge.config import ConfigError
from kvbridge.serve.config_file import ProxyConfig, load_serve_config

YAML = """\
model: tiny
port: 8100
num-gpu-blocks: 128
kv_transfer_config:
  kv_connector: NixlConnector
  kv_role: kv_producer
  kv_connector_extra_config: {side_channel_port: 0}
"""


def test_yaml_file_then_flags(tmp_path: Path):
    path = tmp_path / "p.yaml"
    path.write_text(YAML)
    config = load_serve_config(path, {"port": 9000, "host": None})
    assert (config.model, config.port, config.num_gpu_blocks) == ("tiny", 9000, 128)
    assert config.kv_transfer_config is not None
    assert config.kv_transfer_config.kv_role == "kv_producer"
    kwargs = config.engine_kwargs()
    assert kwargs["num_gpu_blocks"] == 128 and "block_size" not in kwargs


def test_json_file_and_flag_transfer_config(tmp_path: Path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"model": "tiny", "device": "cpu"}))
    flag = '{"kv_connector": "NoOpConnector"}'
    config = load_serve_config(path, {"kv_transfer_config": flag})
    assert config.kv_transfer_config is not None
    assert config.kv_transfer_config.kv_connector == "NoOpConnector"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("modle: tiny\n", "modle: unknown key"),
        ("port: eighty\n", "port: expected int"),
        ("port: 70000\n", "port: 70000"),
        ("enable_prefix_caching: 1\n", "enable_prefix_caching: expected bool"),
        ("num_gpu_blocks: true\n", "num_gpu_blocks: expected int"),
        ("device: tpu\n", "device: 'tpu'"),
        ("kv_transfer_config: {kv_connector: X, kv_rol: p}\n", "kv_rol"),
        ("kv_transfer_config: [1]\n", "kv_transfer_config: expected object"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("model: [unclosed\n", "invalid YAML"),
    ],
)
def test_bad_serve_config_names_the_key(tmp_path: Path, text: str, needle: str):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_serve_config(path, {})
    assert needle in str(info.value)


def test_missing_file_is_named(tmp_path: Path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_serve_config(tmp_path / "nope.yaml", {})


def test_proxy_config(tmp_path: Path):
    path = tmp_path / "proxy.yaml"
    path.write_text("prefill: [http://127.0.0.1:8100]\ndecode: [http://127.0.0.1:8200]\n")
    config = ProxyConfig.load(path, {"port": 0, "decode": None})
    assert config.prefill == ("http://127.0.0.1:8100",) and config.port == 0
    config = ProxyConfig.load(path, {"decode": ["a:1", "b:2"]})
    assert config.decode == ("a:1", "b:2")


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"prefill": ["x:1"]}, "decode: at least one"),
        ({"decode": "x:1"}, "decode: expected a list"),
        ({"decode": ["x:1"], "timeout_s": 0}, "timeout_s"),
        ({"decode": ["x:1"], "prefil": ["y:2"]}, "prefil: unknown key"),
    ],
)
def test_bad_proxy_config(data: dict, needle: str):
    with pytest.raises(ConfigError) as info:
        ProxyConfig.load(None, data)
    assert needle in str(info.value)
