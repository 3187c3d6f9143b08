"""Llama-family decoder (Llama 2/3.x, Mistral, Qwen2, SmolLM2) over a flattened token batch.

q/k/v and gate/up projections are fused into one matrix each (`qkv_proj`, `gate_up_proj`): one
GEMM instead of three (two) per layer. `PACKED_MODULES` tells the loader which Hugging Face
checkpoint tensors are concatenated (along the output dimension, in order) into each.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.model.config import ModelConfig
from engine.model.rope import RotaryEmbedding
from engine.ops import layer_ops
from engine.ops.attention_metadata import AttentionMetadata
from engine.ops.backend import AttentionBackend, TorchAttentionBackend

# fused module -> the checkpoint modules stacked into it, in output-row order
PACKED_MODULES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised x; with `add`, x += add first, in place (the residual stream). Same op order as
        transformers' LlamaRMSNorm; one fused pass (ops/layer_ops.py)."""
        return layer_ops.rms_norm(x, self.weight, self.eps, add)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [T, 2 * I]
        return self.down_proj(layer_ops.silu_and_mul(gate_up))  # [T, I] -> [T, hidden]


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.scale = cfg.head_dim**-0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=cfg.o_bias)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos_sin: tuple[torch.Tensor, torch.Tensor],  # 2 x [T, 1, D], from RotaryEmbedding.cos_sin
        kv_cache: tuple[torch.Tensor, torch.Tensor],  # 2 x [KV, N, B, D]
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, (H + 2 KV) * D]
        qk = qkv[:, : self.q_size + self.kv_size].view(t, self.num_heads + self.num_kv_heads, self.head_dim)
        if not layer_ops.rotate_(qk, *cos_sin):  # q and k heads rotated together, in place
            qk = RotaryEmbedding.rotate(qk, *cos_sin)
        q, k = qk.split((self.num_heads, self.num_kv_heads), dim=1)
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, self.head_dim)
        o = backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)  # [T, H, D]
        return self.o_proj(o.reshape(t, -1))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaBackbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Build under `torch.device("meta")`, load weights, then call `init_rotary(...)`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaBackbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary: RotaryEmbedding | None = None
        self.backend: AttentionBackend = TorchAttentionBackend()
        self._layers: list[LlamaDecoderLayer] = []

    def init_rotary(self, max_positions: int, device: torch.device) -> None:
        self.rotary = RotaryEmbedding(self.config.rope, self.config.head_dim, max_positions).to(device)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer 2 x [KV, N, B, D]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # hidden states [T, hidden]
        if self.rotary is None:
            raise RuntimeError("init_rotary() must be called before forward()")
        if len(self._layers) != len(self.model.layers):
            self._layers = [layer for layer in self.model.layers if isinstance(layer, LlamaDecoderLayer)]
        cos_sin = self.rotary.cos_sin(positions, self.model.embed_tokens.weight.dtype)
        backend = self.backend
        residual = self.model.embed_tokens(input_ids)  # [T, hidden], a new tensor (a row gather)
        layers = self._layers
        x = layers[0].input_layernorm(residual)
        for i, (layer, kv_cache) in enumerate(zip(layers, kv_caches, strict=True)):
            h = layer.self_attn(x, cos_sin, kv_cache, meta, backend)
            x = layer.post_attention_layernorm(residual, add=h)  # residual += h, then normalised
            h = layer.mlp(x)
            next_norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.model.norm
            x = next_norm(residual, add=h)
        return x

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [S, hidden] -> float32 logits [S, vocab]."""
        return self.lm_head(hidden).float()
