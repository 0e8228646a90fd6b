"""A Llama-family decoder (Llama 2/3, Qwen2) in torch, attending over a paged KV cache.

Module and parameter names follow HF's ``LlamaForCausalLM`` (``model.layers.N.self_attn.q_proj``
...), so a HF safetensors checkpoint loads by name. RoPE uses HF's rotate-half convention.

KV cache layout (``KVCacheLayout.BLOCKS_FIRST``): per layer one tensor
``[num_blocks, 2, block_size, num_kv_heads, head_dim]`` named ``layers.{i}``. One block of one
layer, K and V together, is a single contiguous region, so CPU offload copies a block-layer with
one copy and NIXL moves it as one descriptor (vLLM's ``[2, num_blocks, ...]`` needs two).

The forward runs all tokens of all sequences through the linear layers as one flat batch
``[T, hidden]``; only attention is split per sequence (see ``kvbridge.engine.attention``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import sdpa_kernel

from kvbridge.engine.attention import SDPA_BACKENDS, AttentionMetadata, paged_attention
from kvbridge.engine.model_config import ModelConfig, RopeScaling

if TYPE_CHECKING:
    from collections.abc import Sequence

    from kvbridge.engine.runner import LayerHooks


def layer_name(i: int) -> str:
    """Name of layer ``i``'s KV cache, as registered with connectors."""
    return f"layers.{i}"


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 like HF's LlamaRMSNorm."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused kernel (float32 accumulation); identical to HF's float32 path, and within
        # one bf16 rounding of it in bf16.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse RoPE frequencies ``[head_dim / 2]`` (float32, CPU), with optional scaling."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    return _llama3_scaled(inv_freq, scaling)


def _llama3_scaled(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    wavelen = 2 * math.pi / inv_freq
    long_wl = s.original_max_position_embeddings / s.low_freq_factor
    short_wl = s.original_max_position_embeddings / s.high_freq_factor
    slowed = inv_freq / s.factor
    ratio = s.original_max_position_embeddings / wavelen
    smooth = (ratio - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * slowed + smooth * inv_freq
    out = torch.where(wavelen > long_wl, slowed, inv_freq)
    in_band = (wavelen >= short_wl) & (wavelen <= long_wl)
    return torch.where(in_band, blended, out)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions; frequencies kept in float32 on each device used."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self._inv_freq_cpu = rope_inv_freq(config)
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv = self._inv_freq.get(positions.device)
        if inv is None:
            inv = self._inv_freq_cpu.to(positions.device)
            self._inv_freq[positions.device] = inv
        freqs = positions.float()[:, None] * inv[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, head_dim]
        return emb.cos(), emb.sin()


def apply_rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate ``x`` ``[T, heads, head_dim]`` in place by position; cos/sin ``[T, 1, head_dim]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    torch.addcmul(x * cos, rotated, sin, out=x)


class LlamaAttention(nn.Module):
    """Grouped-query self-attention; writes this step's K/V to the paged cache, then attends.

    Q, K and V come from one fused projection ``qkv_proj`` (rows: q, k, v): RoPE runs once, in
    place, on the adjacent q and k heads, and K/V go to the cache without a copy.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.qkv_proj = nn.Linear(h, config.q_size + 2 * config.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(config.q_size, h, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        t, heads, kv_heads = x.shape[0], self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x).view(t, heads + 2 * kv_heads, self.head_dim)
        apply_rope_(qkv[:, : heads + kv_heads], cos, sin)
        new_kv = qkv[:, heads:].view(t, 2, kv_heads, self.head_dim)  # K and V, side by side
        out = paged_attention(qkv[:, :heads], new_kv, kv_cache, meta)
        return self.o_proj(out.reshape(t, -1))


class LlamaMLP(nn.Module):
    """SwiGLU ``down(silu(gate(x)) * up(x))``; gate and up are one fused ``gate_up_proj``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, inter = config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Linear(h, 2 * inter, bias=False)
        self.down_proj = nn.Linear(inter, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention block then pre-norm MLP block, each with a residual."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embeddings, decoder layers and the final norm (HF's ``model.*`` parameters)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Runs on the worker's device; owns the weights (not the KV cache, which is passed in)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.rotary = RotaryEmbedding(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share ``lm_head.weight`` with the embeddings when the config ties them."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: Sequence[torch.Tensor],
        hooks: LayerHooks | None = None,
    ) -> torch.Tensor:
        """Hidden states ``[T, hidden]`` before the final norm, for flat ``input_ids`` ``[T]``."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = (t.to(x.dtype)[:, None, :] for t in self.rotary(meta.positions))
        with sdpa_kernel(SDPA_BACKENDS):
            for i, layer in enumerate(self.model.layers):
                name = layer_name(i)
                if hooks is not None:
                    hooks.before_layer(name)
                x = layer(x, cos, sin, kv_caches[i], meta)
                if hooks is not None:
                    hooks.after_layer(name, kv_caches[i])
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[n, vocab]`` for the rows of ``forward``'s output to sample from."""
        return self.lm_head(self.model.norm(hidden)).float()

    def hf_tensors(self) -> dict[str, torch.Tensor]:
        """HF parameter name -> the tensor holding it (a row slice of a fused weight, or a
        whole parameter). The tied ``lm_head.weight`` is left out, as HF leaves it out."""
        c = self.config
        out: dict[str, torch.Tensor] = {}
        fused = {  # fused parameter -> [(HF name, rows)]
            "self_attn.qkv_proj": [
                ("self_attn.q_proj", c.q_size),
                ("self_attn.k_proj", c.kv_size),
                ("self_attn.v_proj", c.kv_size),
            ],
            "mlp.gate_up_proj": [
                ("mlp.gate_proj", c.intermediate_size),
                ("mlp.up_proj", c.intermediate_size),
            ],
        }
        for name, param in self.named_parameters():
            module, _, kind = name.rpartition(".")  # kind: weight | bias
            parts = next(((k, v) for k, v in fused.items() if module.endswith(k)), None)
            if parts is None:
                out[name] = param
                continue
            prefix = module[: -len(parts[0])]
            row = 0
            for hf_module, rows in parts[1]:
                out[f"{prefix}{hf_module}.{kind}"] = param[row : row + rows]
                row += rows
        return out
