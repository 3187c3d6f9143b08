"""Attention backends: on CPU the compiled kernels (engine/ops/cpu_native.py) with the torch
reference for the rest, or the reference alone; on CUDA, Triton kernels.

Both use the cache layout of `reference.kv_cache_shape`: [num_kv_heads, num_blocks, block_size,
head_dim] per layer, so a cache written by one backend reads the same in the other.
"""

from __future__ import annotations

from typing import Protocol

import torch

from engine.ops import cpu_native, reference
from engine.ops.attention_metadata import AttentionMetadata


class AttentionBackend(Protocol):
    name: str

    def forward(
        self,
        query: torch.Tensor,  # [T, H, D]
        key: torch.Tensor,  # [T, KV, D]
        value: torch.Tensor,  # [T, KV, D]
        key_cache: torch.Tensor,  # [KV, N, B, D]
        value_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, H, D]
        ...


class TorchAttentionBackend:
    """Writes new K/V to the cache, then attends over the cache with the reference ops.

    Decodes run per length bucket (meta.buckets()), so a short context is not padded to the
    longest one in the batch.
    """

    name = "torch"

    def __init__(self) -> None:
        self.workspace = reference.GatherWorkspace()

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
        buckets = meta.buckets()
        if not meta.num_prefills and len(buckets) == 1:  # the common decode-only step: no copy into `out`
            return self._decode(query, key_cache, value_cache, meta, buckets[0], scale)
        out = torch.empty_like(query)
        for bucket in buckets:
            out[bucket[0] : bucket[1]] = self._decode(query, key_cache, value_cache, meta, bucket, scale)
        if meta.num_prefills:
            out[nd:] = self._prefill(query, key, value, key_cache, value_cache, meta, scale)
        return out

    def _prefill(
        self,
        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
        value_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
    ) -> torch.Tensor:
        nd = meta.num_decode_tokens
        plans = meta.scratch.setdefault("prefill_plans", {})
        return reference.paged_prefill_attention(
            query[nd:], key_cache, value_cache, meta.prefill_block_tables,
            meta.prefill_query_start_loc_host, meta.prefill_seq_lens_host, scale,
            key=key[nd:], value=value[nd:], plans=plans, workspace=self.workspace,
        )

    def _decode(
        self,
        query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, meta: AttentionMetadata,
        bucket: tuple[int, int, int], scale: float,
    ) -> torch.Tensor:
        start, end, max_len = bucket
        tables, lens = meta.decode_block_tables[start:end], meta.decode_seq_lens[start:end]
        plan = meta.scratch.get(("decode", start))
        if plan is None:  # once per step; every layer reuses it
            plan = reference.decode_plan(tables, lens, max_len, key_cache.shape, query.dtype)
            meta.scratch[("decode", start)] = plan
        return reference.paged_decode_attention(
            query[start:end], key_cache, value_cache, tables, lens, max_len, scale, plan=plan,
            workspace=self.workspace,
        )


class CpuAttentionBackend(TorchAttentionBackend):
    """The CPU path with the compiled kernels: new K/V are copied into their slots, then all decodes
    of a step attend over their pages in place in one call, and all prefill chunks (fresh prompts,
    or chunks over a cached prefix) in another: no gather, no length buckets, no padding. A dtype
    or head size the kernels do not take runs the reference instead. The returned tensor is reused
    by the next call (consume it first, as the model's output projection does).
    """

    name = "cpu"

    def __init__(self) -> None:
        if not cpu_native.available():
            raise ValueError(f"attention_backend 'cpu' needs the compiled CPU kernels: {cpu_native.reason()}")
        super().__init__()

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
        if not (cpu_native.supports(query, key_cache) and key.dtype == value.dtype == key_cache.dtype):
            return super().forward(query, key, value, key_cache, value_cache, meta, scale)
        cpu_native.write_kv_cache(key, value, key_cache, value_cache, meta.slot_mapping)
        # One buffer for every layer's output (a fresh multi-MB tensor per prefill layer costs page
        # faults): the caller's output projection consumes it before the next layer's attention.
        out = self.workspace.take(2, query.numel(), query).view(query.shape)
        nd = meta.num_decode_tokens
        if nd:
            cpu_native.paged_decode_attention(
                query[:nd], key_cache, value_cache, meta.decode_block_tables, meta.decode_seq_lens, scale, out=out[:nd]
            )
        if meta.num_prefills:
            cpu_native.paged_prefill_attention(
                query[nd:], key_cache, value_cache, meta.prefill_block_tables, meta.prefill_query_start_loc,
                meta.prefill_seq_lens, scale, out=out[nd:],
            )
        return out


def get_backend(device: torch.device, name: str = "auto") -> AttentionBackend:
    """`auto` picks Triton on CUDA when importable, else the torch reference; on CPU the compiled
    kernels when built, else the torch reference. An explicit name that cannot be served raises."""
    on_cuda = device.type == "cuda"
    if name == "cpu":
        if on_cuda:
            raise ValueError(f"attention_backend 'cpu' runs on the CPU only; this engine's device is {device}")
        return CpuAttentionBackend()
    if name == "torch":
        return TorchAttentionBackend()
    if name == "auto" and not on_cuda:
        return CpuAttentionBackend() if cpu_native.available() else TorchAttentionBackend()
    try:
        from engine.ops.triton_backend import TritonAttentionBackend
    except ImportError:
        if name == "triton":
            raise
        return TorchAttentionBackend()
    return TritonAttentionBackend()
