"""ModelConfig: the shape of a Llama-family decoder, named presets and HF ``config.json`` parsing.

Torch-free, so the scheduler half can read model shapes (e.g. to size a KV cache spec).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "qwen2")
SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3")

_POSITIVE_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "max_position_embeddings",
)


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (``rope_scaling`` / ``rope_parameters`` in HF configs).

    ``linear`` divides every frequency by ``factor``; ``llama3`` is Llama-3.1's band-wise rule.
    """

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES or self.rope_type == "default":
            raise ValueError(
                f"rope_scaling.rope_type: {self.rope_type!r} is not supported "
                f"(supported: {', '.join(t for t in SUPPORTED_ROPE_TYPES if t != 'default')})"
            )
        if not self.factor > 0:
            raise ValueError(f"rope_scaling.factor: must be > 0, got {self.factor!r}")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError("rope_scaling.high_freq_factor: must be > low_freq_factor")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder (Llama 2/3, Qwen2 with q/k/v bias)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    attention_bias: bool = False
    rope_scaling: RopeScaling | None = None
    # Further end-of-sequence ids (HF configs may list several, e.g. Llama-3 instruct).
    extra_eos_token_ids: tuple[int, ...] = ()
    name: str = ""

    def __post_init__(self) -> None:
        for key in _POSITIVE_INT_FIELDS:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{key}: must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_kv_heads: {self.num_kv_heads} must divide "
                f"num_heads={self.num_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim: must be even for RoPE, got {self.head_dim}")
        for key in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, key)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"ModelConfig.{key}: must be a finite number > 0, got {value!r}")
        for key in ("eos_token_id", "bos_token_id"):
            self._check_token_id(key, getattr(self, key))
        for tok in self.extra_eos_token_ids:
            self._check_token_id("extra_eos_token_ids", tok)

    def _check_token_id(self, key: str, tok: int | None) -> None:
        if tok is None:
            return
        if isinstance(tok, bool) or not isinstance(tok, int) or not 0 <= tok < self.vocab_size:
            raise ValueError(
                f"ModelConfig.{key}: {tok!r} is not a token id in [0, {self.vocab_size})"
            )

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """All end-of-sequence ids (``eos_token_id`` first)."""
        first = () if self.eos_token_id is None else (self.eos_token_id,)
        return first + self.extra_eos_token_ids

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_parameters(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        h, layers = self.hidden_size, self.num_layers
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        per_layer = attn + 3 * h * self.intermediate_size + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + layers * per_layer + h + head

    def with_overrides(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], *, name: str = "") -> ModelConfig:
        """Parse a HF ``config.json`` of a Llama or Qwen2 model (legacy and v5 rope keys)."""
        model_type = d.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type: {model_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        for key in ("vocab_size", "hidden_size", "intermediate_size"):
            if key not in d:
                raise ValueError(f"{key}: missing from the HF config")
        for key in ("num_hidden_layers", "num_attention_heads"):
            if key not in d:
                raise ValueError(f"{key}: missing from the HF config")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act: only 'silu' is supported, got {d['hidden_act']!r}")
        if d.get("mlp_bias", False):
            raise ValueError("mlp_bias: MLP biases are not supported")
        if d.get("use_sliding_window", False):
            raise ValueError("use_sliding_window: sliding-window attention is not supported")
        num_heads = int(d["num_attention_heads"])
        head_dim = d.get("head_dim") or int(d["hidden_size"]) // num_heads
        rope_theta, rope_scaling = _parse_rope(d)
        eos = d.get("eos_token_id")
        eos_ids: list[int] = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rope_theta=rope_theta,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            eos_token_id=eos_ids[0] if eos_ids else None,
            bos_token_id=d.get("bos_token_id"),
            # Qwen2 always has q/k/v biases; Llama declares them with attention_bias.
            attention_bias=model_type == "qwen2" or bool(d.get("attention_bias", False)),
            rope_scaling=rope_scaling,
            extra_eos_token_ids=tuple(eos_ids[1:]),
            name=name or str(d.get("_name_or_path", "") or model_type),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A HF ``config.json`` dict (Llama naming; legacy rope keys, read by all versions)."""
        rope: dict[str, Any] | None = None
        if self.rope_scaling is not None:
            rope = {f.name: getattr(self.rope_scaling, f.name) for f in fields(RopeScaling)}
        eos: int | list[int] | None = self.eos_token_id
        if self.extra_eos_token_ids:
            eos = list(self.eos_token_ids)
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rope_scaling": rope,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "torch_dtype": "float32",
        }


def _parse_rope(d: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"rope_scaling: must be an object, got {type(params).__name__}")
    theta = float(d.get("rope_theta") or params.get("rope_theta") or 10000.0)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type == "default":
        return theta, None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_scaling.rope_type: {rope_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    known = {f.name for f in fields(RopeScaling)} - {"rope_type"}
    kwargs = {k: v for k, v in params.items() if k in known}
    return theta, RopeScaling(rope_type=rope_type, **kwargs)


# Tokens 0-255 are bytes; 256/257 are BOS/EOS, so a byte-level tokenizer fits the tiny vocab.
NAMED_CONFIGS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        bos_token_id=256,
        eos_token_id=257,
        name="tiny",
    ),
    "small": ModelConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=768,
        num_layers=4,
        num_heads=8,
        num_kv_heads=4,
        head_dim=32,
        max_position_embeddings=8192,
        bos_token_id=256,
        eos_token_id=257,
        name="small",
    ),
    # Llama-3.2-1B shapes (without its llama3 rope scaling; weights are random anyway).
    "llama3-1b": ModelConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128001,
        name="llama3-1b",
    ),
    # Llama-3-8B shapes.
    "llama3-8b": ModelConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
        bos_token_id=128000,
        eos_token_id=128001,
        name="llama3-8b",
    ),
}
# Llama-3.1-8B: the same shapes with llama3 rope scaling and a 128k context (long-prompt benches).
NAMED_CONFIGS["llama3.1-8b"] = replace(
    NAMED_CONFIGS["llama3-8b"],
    max_position_embeddings=131072,
    rope_scaling=RopeScaling(
        "llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
    name="llama3.1-8b",
)


def get_model_config(name: str) -> ModelConfig:
    """The named preset; unknown names raise ``ValueError`` listing the known ones."""
    try:
        return NAMED_CONFIGS[name]
    except KeyError:
        raise ValueError(
            f"model: unknown config {name!r} (known: {', '.join(sorted(NAMED_CONFIGS))})"
        ) from None
