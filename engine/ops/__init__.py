"""Attention ops over a paged KV cache: torch reference and Triton kernels."""

from engine.ops.attention_metadata import AttentionMetadata
from engine.ops.backend import AttentionBackend, TorchAttentionBackend, get_backend
from engine.ops.reference import (
    gather_pages,
    head_page_ids,
    kv_cache_shape,
    paged_decode_attention,
    paged_prefill_attention,
    write_kv_cache,
)

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "TorchAttentionBackend",
    "gather_pages",
    "get_backend",
    "head_page_ids",
    "kv_cache_shape",
    "paged_decode_attention",
    "paged_prefill_attention",
    "write_kv_cache",
]
