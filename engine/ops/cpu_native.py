"""Compiled CPU kernels over the paged KV cache (engine/csrc/cpu_kernels.cpp, built at install).

Decode attention here reads every context's pages where they lie: the torch reference must first
gather them into a padded batch buffer (read + write of the whole context) and then run SDPA over
the padding; this reads each context once, padding-free. Measured on the bench's decode shapes
(64 contexts of 16-320 tokens, SmolLM2's 3 kv heads x 3 query heads x 64): about 2x faster than
the reference over a cold cache (docs/benchmarks.md). The KV write copies rows with memcpy
instead of two `index_copy_` calls.

The extension is optional at import: a source tree that was never built, or a platform without
a compiler at build time, runs the torch reference (`available()` says which, `reason()` why).
Supported: CPU tensors of float32 or bfloat16, head_dim a multiple of 16; anything else goes to
the reference per call (`supports`).
"""

from __future__ import annotations

import torch

try:
    from engine import _cpu_kernels as _native  # type: ignore[attr-defined]

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # not built: the torch reference serves
    _native = None
    _IMPORT_ERROR = f"engine._cpu_kernels is not built ({exc}); reinstall the package to build it"

_DTYPES = (torch.float32, torch.bfloat16)


def available() -> bool:
    return _native is not None


def reason() -> str | None:
    """Why the kernels are unavailable, or None."""
    return _IMPORT_ERROR


def supports(query: torch.Tensor, cache: torch.Tensor) -> bool:
    """Whether the kernels take this query [*, H, D] against this cache [KV, N, B, D]."""
    return (
        _native is not None
        and query.device.type == "cpu"
        and query.dtype in _DTYPES
        and cache.dtype == query.dtype
        and query.shape[-1] % 16 == 0
        and query.stride(-1) == 1
    )


def paged_decode_attention(
    query: torch.Tensor,  # [S, H, D]
    key_cache: torch.Tensor,  # [KV, N, B, D]
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, max_blocks] int32
    seq_lens: torch.Tensor,  # [S] int32, context lengths incl. the new token (>= 1)
    scale: float,
) -> torch.Tensor:
    """Same contract as reference.paged_decode_attention (no padding, no plan). Returns [S, H, D]."""
    if _native is None:
        raise RuntimeError(_IMPORT_ERROR)
    out = torch.empty(query.shape, dtype=query.dtype)
    _native.paged_decode_attention(
        out, query, key_cache, value_cache, block_tables.to(torch.int32).contiguous(),
        seq_lens.to(torch.int32).contiguous(), scale,
    )
    return out


def write_kv_cache(
    key: torch.Tensor,  # [T, KV, D], same dtype as the cache
    value: torch.Tensor,
    key_cache: torch.Tensor,  # [KV, N, B, D]
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64; slot < 0 = do not write
) -> None:
    if _native is None:
        raise RuntimeError(_IMPORT_ERROR)
    _native.write_kv_cache(key, value, key_cache, value_cache, slot_mapping.to(torch.int64).contiguous())
