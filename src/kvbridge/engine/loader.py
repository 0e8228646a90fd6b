"""Weights for ``LlamaForCausalLM``: seeded random init, and HF safetensors load/save.

Random init draws every tensor on the CPU from its own ``torch.Generator`` seeded by
``(seed, HF parameter name)``, so two processes (a prefill and a decode engine) given the same seed
get bit-identical weights whatever their device, and order of construction does not matter.
"""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kvbridge.engine.model import LlamaForCausalLM
from kvbridge.engine.model_config import ModelConfig

logger = logging.getLogger(__name__)

INIT_STD = 0.02
# Tensors some checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint directory is unreadable or does not match the model; names the tensor."""


class LoadedModel(NamedTuple):
    """A model built from a checkpoint and the config read from it."""

    model: LlamaForCausalLM
    config: ModelConfig


def build_empty_model(
    config: ModelConfig, *, dtype: torch.dtype, device: str | torch.device
) -> LlamaForCausalLM:
    """The model with uninitialised weights on ``device`` (no float32 CPU copy on the way)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.tie_weights()
    return model.requires_grad_(False).eval()


def _param_seed(seed: int, name: str) -> int:
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (1 << 63)


def init_random(
    config: ModelConfig,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    std: float = INIT_STD,
) -> LlamaForCausalLM:
    """Deterministic random weights: N(0, std) matrices and biases, norms at one."""
    model = build_empty_model(config, dtype=dtype, device=device)
    with torch.no_grad():
        for name, param in model.hf_tensors().items():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            gen = torch.Generator(device="cpu").manual_seed(_param_seed(seed, name))
            values = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
            param.copy_(values.to(dtype))
    return model


def read_hf_config(path: str | Path) -> ModelConfig:
    """``ModelConfig`` from a checkpoint directory's ``config.json``."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"checkpoint: {config_path} not found")
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint: cannot read {config_path}: {exc}") from exc
    return ModelConfig.from_hf_dict(raw, name=Path(path).name)


def load_hf_checkpoint(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Load ``config.json`` + ``*.safetensors`` (Llama/Qwen2 names) into a new model."""
    root = Path(path)
    config = read_hf_config(root)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"checkpoint: no *.safetensors files in {root}")
    model = build_empty_model(config, dtype=dtype, device=device)
    params = model.hf_tensors()  # HF name -> tensor (or row slice of a fused one) to fill
    where: dict[str, Path] = {}  # tensor name -> file holding it
    extra: list[str] = []
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key in where:
                    raise CheckpointError(f"checkpoint: tensor {key} appears in two files")
                where[key] = file
                tied_head = key == "lm_head.weight" and config.tie_word_embeddings
                if key not in params and not tied_head and not key.endswith(_IGNORED_SUFFIXES):
                    extra.append(key)
    missing = sorted(set(params) - set(where))
    if missing or extra:
        raise CheckpointError(
            f"checkpoint {root}: tensors do not match the {config.name!r} model: "
            f"missing {_preview(missing)}, unexpected {_preview(sorted(extra))}"
        )
    with torch.no_grad():
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118
                    param = params.get(key)
                    if param is None:
                        continue
                    tensor = f.get_tensor(key)
                    if tuple(tensor.shape) != tuple(param.shape):
                        raise CheckpointError(
                            f"checkpoint: tensor {key} has shape {tuple(tensor.shape)}, "
                            f"the config needs {tuple(param.shape)}"
                        )
                    param.copy_(tensor.to(dtype))
    logger.info("loaded %s: %d tensors from %d file(s)", root, len(params), len(files))
    return LoadedModel(model, config)


def _preview(names: list[str], limit: int = 5) -> str:
    if not names:
        return "none"
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def save_hf_checkpoint(model: LlamaForCausalLM, config: ModelConfig, path: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` in HF Llama format; returns the dir."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.hf_tensors().items()}
    hf = config.to_hf_dict()
    hf["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    (root / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    return root
