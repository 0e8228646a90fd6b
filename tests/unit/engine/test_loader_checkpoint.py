"""Loader: deterministic random init, HF safetensors save/load, and checkpoint errors."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvbridge.engine.loader import (
    CheckpointError,
    init_random,
    load_hf_checkpoint,
    read_hf_config,
    save_hf_checkpoint,
)
from kvbridge.engine.model_config import NAMED_CONFIGS, ModelConfig
from kvbridge.engine.runner import ModelRunner, SeqChunk

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TINY = NAMED_CONFIGS["tiny"]
BIASED = dataclasses.replace(TINY, attention_bias=True, tie_word_embeddings=True, name="biased")

_CHECKSUM = (
    "import torch; from kvbridge.engine.loader import init_random; "
    "from kvbridge.engine.model_config import NAMED_CONFIGS; "
    "m = init_random(NAMED_CONFIGS['tiny'], seed=7); "
    "print(sum(float(p.double().sum()) * (i + 1) for i, p in enumerate(m.parameters())))"
)


def _checksum(model: torch.nn.Module) -> float:
    return sum(float(p.double().sum()) * (i + 1) for i, p in enumerate(model.parameters()))


def test_random_init_is_deterministic_across_processes() -> None:
    here = _checksum(init_random(TINY, seed=7))
    there = subprocess.run(
        [sys.executable, "-c", _CHECKSUM], capture_output=True, text=True, check=True, timeout=120
    )
    assert float(there.stdout.strip()) == here
    assert _checksum(init_random(TINY, seed=8)) != here


def test_random_init_values_and_dtype() -> None:
    torch.manual_seed(123)  # the global RNG must not matter
    a = init_random(BIASED, seed=1, dtype=torch.bfloat16)
    torch.manual_seed(456)
    b = init_random(BIASED, seed=1, dtype=torch.bfloat16)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert pa.dtype == torch.bfloat16
        assert torch.equal(pa, pb), name
    assert torch.all(a.model.norm.weight == 1)
    q_bias = a.hf_tensors()["model.layers.0.self_attn.q_proj.bias"]
    assert q_bias.float().std() > 0.01
    assert a.lm_head.weight is a.model.embed_tokens.weight  # tied


@pytest.mark.parametrize("config", [TINY, BIASED], ids=["tiny", "tied-bias"])
def test_save_then_load_round_trip(tmp_path: Path, config: ModelConfig) -> None:
    model = init_random(config, seed=3)
    save_hf_checkpoint(model, config, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert ("lm_head.weight" in tensors) != config.tie_word_embeddings
    assert "model.layers.1.self_attn.q_proj.weight" in tensors
    loaded, loaded_config = load_hf_checkpoint(tmp_path)
    assert loaded_config == dataclasses.replace(config, name=tmp_path.name)
    for (name, p), q in zip(model.named_parameters(), loaded.parameters()):
        assert torch.equal(p, q), name


def test_saved_checkpoint_loads_in_transformers(tmp_path: Path) -> None:
    """transformers reads our config.json and tensors as the same model (bias, tied head)."""
    transformers = pytest.importorskip("transformers")
    save_hf_checkpoint(init_random(BIASED, seed=5, std=0.2), BIASED, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = [3, 17, 256, 99, 4]
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0, -1]
    runner = ModelRunner(
        read_hf_config(tmp_path), num_blocks=4, block_size=4, checkpoint=str(tmp_path)
    )
    got = runner.execute([SeqChunk("r", ids, 0, [2, 0], True)])[0]
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4


def _write(tmp_path: Path, mutate: str) -> Path:
    model = init_random(TINY, seed=0)
    save_hf_checkpoint(model, TINY, tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(str(path))
    if mutate == "missing":
        del tensors["model.layers.1.mlp.up_proj.weight"]
    elif mutate == "extra":
        tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    elif mutate == "shape":
        tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    elif mutate == "split":
        part = {k: tensors.pop(k) for k in list(tensors) if k.startswith("model.layers.1.")}
        save_file(part, str(tmp_path / "model-00002.safetensors"), metadata={"format": "pt"})
    save_file(tensors, str(path), metadata={"format": "pt"})
    return tmp_path


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        ("missing", r"missing model\.layers\.1\.mlp\.up_proj\.weight, unexpected none"),
        ("extra", r"missing none, unexpected model\.layers\.0\.self_attn\.q_norm\.weight"),
        ("shape", r"k_proj\.weight has shape \(16, 64\), the config needs \(32, 64\)"),
    ],
)
def test_bad_checkpoint_errors_name_the_tensor(tmp_path: Path, mutate: str, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        load_hf_checkpoint(_write(tmp_path, mutate))


def test_sharded_checkpoint_loads(tmp_path: Path) -> None:
    loaded, _ = load_hf_checkpoint(_write(tmp_path, "split"))
    want = init_random(TINY, seed=0)
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(loaded.hf_tensors()[name], want.hf_tensors()[name])
    assert torch.equal(
        loaded.model.layers[1].mlp.gate_up_proj.weight[-32:], want.hf_tensors()[name][-32:]
    )


def test_missing_files_and_bad_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="config.json"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_hf_checkpoint(tmp_path)
