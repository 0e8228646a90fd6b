"""ModelConfig: validation, named presets, HF config.json parsing and RoPE frequencies."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pytest
import torch

from kvbridge.engine.model import rope_inv_freq
from kvbridge.engine.model_config import (
    NAMED_CONFIGS,
    ModelConfig,
    RopeScaling,
    get_model_config,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _tiny(**changes: Any) -> ModelConfig:
    return dataclasses.replace(NAMED_CONFIGS["tiny"], **changes)


def test_named_configs_shapes() -> None:
    tiny = get_model_config("tiny")
    assert tiny.vocab_size >= 259 and tiny.num_layers == 2 and tiny.hidden_size == 64
    assert (tiny.num_heads, tiny.num_kv_heads) == (4, 2)
    assert tiny.eos_token_id is not None and tiny.eos_token_id >= 256  # above the byte range
    big = get_model_config("llama3-8b")
    assert (big.num_layers, big.num_kv_heads, big.head_dim, big.hidden_size) == (32, 8, 128, 4096)
    assert 7.9e9 < big.num_parameters() < 8.1e9
    mid = get_model_config("llama3-1b")
    assert 1.1e9 < mid.num_parameters() < 1.4e9 and mid.tie_word_embeddings


def test_unknown_named_config_lists_known() -> None:
    with pytest.raises(ValueError, match=r"unknown config 'nope'.*llama3-8b"):
        get_model_config("nope")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"hidden_size": 0}, "hidden_size"),
        ({"num_layers": -1}, "num_layers"),
        ({"vocab_size": 3.5}, "vocab_size"),
        ({"num_kv_heads": 3}, "num_kv_heads"),
        ({"head_dim": 15}, "head_dim"),
        ({"rope_theta": 0.0}, "rope_theta"),
        ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
        ({"eos_token_id": 512}, "eos_token_id"),
        ({"bos_token_id": -1}, "bos_token_id"),
        ({"extra_eos_token_ids": (9999,)}, "extra_eos_token_ids"),
    ],
)
def test_validation_names_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        _tiny(**changes)


def test_rope_scaling_validation() -> None:
    with pytest.raises(ValueError, match="rope_scaling.rope_type"):
        RopeScaling("yarn")
    with pytest.raises(ValueError, match="rope_scaling.factor"):
        RopeScaling("linear", factor=0.0)


def test_from_hf_dict_v5_llama() -> None:
    d = {
        "model_type": "llama",
        "vocab_size": 1000,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 3,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
        "rms_norm_eps": 1e-5,
        "eos_token_id": [5, 6],
        "bos_token_id": 4,
        "tie_word_embeddings": True,
    }
    c = ModelConfig.from_hf_dict(d)
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (3, 8, 2, 16)
    assert c.rope_theta == 500000.0 and c.rope_scaling is None
    assert c.eos_token_id == 5 and c.eos_token_ids == (5, 6) and c.bos_token_id == 4
    assert c.tie_word_embeddings and not c.attention_bias
    # Round trip through our own config.json writer.
    assert ModelConfig.from_hf_dict(c.to_hf_dict(), name=c.name) == c


def test_from_hf_dict_legacy_llama3_scaling_and_qwen2_bias() -> None:
    d = {
        "vocab_size": 1000,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64},
    }
    c = ModelConfig.from_hf_dict(d)
    assert c.num_kv_heads == 4 and c.rope_scaling == RopeScaling(
        "llama3", factor=8.0, original_max_position_embeddings=64
    )
    q = ModelConfig.from_hf_dict({**d, "model_type": "qwen2", "rope_scaling": None})
    assert q.attention_bias and q.rope_scaling is None


@pytest.mark.parametrize(
    ("patch", "key"),
    [
        ({"model_type": "gemma"}, "model_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type"),
        ({"num_attention_heads": 6}, "num_kv_heads"),
    ],
)
def test_from_hf_dict_rejects_unsupported(patch: dict[str, Any], key: str) -> None:
    base = {
        "vocab_size": 100,
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
    }
    with pytest.raises(ValueError, match=key):
        ModelConfig.from_hf_dict({**base, **patch})


def test_from_hf_dict_missing_key() -> None:
    with pytest.raises(ValueError, match="num_hidden_layers"):
        ModelConfig.from_hf_dict({"vocab_size": 10, "hidden_size": 8, "intermediate_size": 8})


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ],
)
def test_rope_frequencies_match_transformers(rope: dict[str, Any]) -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = transformers.LlamaConfig(
        hidden_size=4096,
        num_attention_heads=32,
        rope_parameters={**rope, "rope_theta": 500000.0},
    )
    want, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_config, "cpu")
    ours = ModelConfig.from_hf_dict(hf_config.to_dict())
    torch.testing.assert_close(rope_inv_freq(ours), want.float(), rtol=1e-6, atol=0)
