"""Attention backends: the torch reference (CPU path) and, on CUDA, Triton kernels."""

from __future__ import annotations

from typing import Protocol

import torch

from engine.ops import reference
from engine.ops.attention_metadata import AttentionMetadata


class AttentionBackend(Protocol):
    name: str

    def forward(
        self,
        query: torch.Tensor,  # [T, H, D]
        key: torch.Tensor,  # [T, KV, D]
        value: torch.Tensor,  # [T, KV, D]
        key_cache: torch.Tensor,  # [N, B, KV, D]
        value_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, H, D]
        ...


class TorchAttentionBackend:
    """Writes new K/V to the cache, then attends over the cache with the reference ops."""

    name = "torch"

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        reference.write_kv_cache(key, value, key_cache, value_cache, meta.slot_mapping)
        nd = meta.num_decode_tokens
        out = torch.empty_like(query)
        if nd:
            out[:nd] = reference.paged_decode_attention(
                query[:nd], key_cache, value_cache, meta.decode_block_tables,
                meta.decode_seq_lens, meta.decode_max_seq_len, scale,
            )
        if meta.num_prefills:
            out[nd:] = reference.paged_prefill_attention(
                query[nd:], key_cache, value_cache, meta.prefill_block_tables,
                meta.prefill_query_start_loc_host, meta.prefill_seq_lens_host, scale,
            )
        return out


def get_backend(device: torch.device, name: str = "auto") -> AttentionBackend:
    """`auto` picks Triton on CUDA when importable, else the torch reference."""
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return TorchAttentionBackend()
    try:
        from engine.ops.triton_backend import TritonAttentionBackend
    except ImportError:
        if name == "triton":
            raise
        return TorchAttentionBackend()
    return TritonAttentionBackend()
