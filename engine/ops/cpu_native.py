"""Compiled CPU kernels (engine/csrc, the extension engine._cpu_kernels, built at install).

- Paged attention (csrc/paged_attention.cpp, csrc/prefill_attention.cpp): decode and prefill
  attention read every context's pages where they lie; the torch reference must first gather them
  into a padded batch buffer (read + write of the whole context) and then run SDPA over the
  padding; these read each context once, padding-free. Decode: about 3x faster than the reference
  over a cold cache on the bench's decode shapes (64 contexts of 16-320 tokens, SmolLM2's 3 kv
  heads x 3 query heads x 64). Prefill: tiles of up to 64 query rows against 16 keys at a time
  with the rows in the vector lanes, faster than torch's fused SDPA on fresh prompts and without
  the gather on a cached prefix. The KV write copies rows with memcpy instead of two
  `index_copy_` calls.
- The decoder layer's element-wise ops (csrc/layer_ops.cpp), each one pass instead of several
  torch ops and temporaries: RMSNorm (optionally after the residual add), SiLU-and-multiply,
  rotary embedding in place. Same formulas and op order as transformers; the results differ from
  torch's in the last bits only (summation order, a polynomial exp): tests bound it.

The extension is optional at import: a source tree that was never built runs the torch reference
(`available()` says which, `reason()` why). Supported: CPU tensors of float32 or bfloat16 (and
head_dim a multiple of 16 for attention); anything else, and every CUDA tensor, takes the torch
ops per call.
"""

from __future__ import annotations

from types import ModuleType

import torch

_native: ModuleType | None
try:
    from engine import _cpu_kernels as _native

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # not built: the torch reference serves
    _native = None
    _IMPORT_ERROR = f"engine._cpu_kernels is not built ({exc}); reinstall the package to build it"


def _lib() -> ModuleType:
    if _native is None:
        raise RuntimeError(_IMPORT_ERROR)
    return _native


_DTYPES = (torch.float32, torch.bfloat16)


def available() -> bool:
    return _native is not None


def reason() -> str | None:
    """Why the kernels are unavailable, or None."""
    return _IMPORT_ERROR


def supports(query: torch.Tensor, cache: torch.Tensor) -> bool:
    """Whether the attention kernels take this query [*, H, D] against this cache [KV, N, B, D]."""
    return _fusable(query, cache) and query.shape[-1] % 16 == 0


def paged_decode_attention(
    query: torch.Tensor,  # [S, H, D]
    key_cache: torch.Tensor,  # [KV, N, B, D]
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, max_blocks] int32
    seq_lens: torch.Tensor,  # [S] int32, context lengths incl. the new token (>= 1)
    scale: float,
    out: torch.Tensor | None = None,  # [S, H, D] contiguous, written; allocated when None
) -> torch.Tensor:
    """Same contract as reference.paged_decode_attention (no padding, no plan). Returns [S, H, D]."""
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype)
    _lib().paged_decode_attention(
        out, query, key_cache, value_cache, block_tables.to(torch.int32).contiguous(),
        seq_lens.to(torch.int32).contiguous(), scale,
    )
    return out


def paged_prefill_attention(
    query: torch.Tensor,  # [Tp, H, D] the new tokens of all prefill chunks, concatenated
    key_cache: torch.Tensor,  # [KV, N, B, D], the chunks' own K/V already written
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [P, max_blocks] int32
    query_start_loc: torch.Tensor,  # [P + 1] int32 offsets into query
    seq_lens: torch.Tensor,  # [P] int32 context lengths after each chunk
    scale: float,
    out: torch.Tensor | None = None,  # [Tp, H, D] (rows may be strided), written; allocated when None
) -> torch.Tensor:
    """Same contract as reference.paged_prefill_attention: causal attention of each chunk over its
    cached prefix and itself, read from the cache pages in place. Returns [Tp, H, D]."""
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype)
    _lib().paged_prefill_attention(
        out, query, key_cache, value_cache, block_tables.to(torch.int32).contiguous(),
        query_start_loc.to(torch.int32).contiguous(), seq_lens.to(torch.int32).contiguous(), scale,
    )
    return out


def write_kv_cache(
    key: torch.Tensor,  # [T, KV, D], same dtype as the cache
    value: torch.Tensor,
    key_cache: torch.Tensor,  # [KV, N, B, D]
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64; slot < 0 = do not write
) -> None:
    _lib().write_kv_cache(key, value, key_cache, value_cache, slot_mapping.to(torch.int64).contiguous())


# ---- the decoder layer's element-wise ops: fused on CPU, the same torch ops elsewhere -------------


def _fusable(*tensors: torch.Tensor) -> bool:
    first = tensors[0]
    return (
        _native is not None
        and first.device.type == "cpu"
        and first.dtype in _DTYPES
        and all(t.dtype == first.dtype and t.stride(-1) == 1 for t in tensors)
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, add: torch.Tensor | None = None) -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2) + eps)) over the last dim of x [T, H], in transformers' op order.

    With `add`, x += add first, in place (the residual stream), and the sum is normalised: one pass
    instead of five torch ops. The result is a new tensor."""
    if x.dim() == 2 and _fusable(x, weight, *(() if add is None else (add,))):
        out = torch.empty(x.shape, dtype=x.dtype)
        _lib().rms_norm(out, x, add, weight, eps)
        return out
    if add is not None:
        x.add_(add)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2 I] -> silu(gate) * up [T, I] (one pass instead of two ops and a temporary)."""
    size = gate_up.shape[-1] // 2
    if gate_up.dim() == 2 and _fusable(gate_up):
        out = torch.empty((gate_up.shape[0], size), dtype=gate_up.dtype)
        _lib().silu_and_mul(out, gate_up)
        return out
    gate, up = gate_up.split(size, dim=-1)
    return torch.nn.functional.silu(gate).mul_(up)


def rotate_(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> bool:
    """Rotate x [T, heads, D] by cos / sin_signed [T, 1, D] (RotaryEmbedding.cos_sin) in place, in
    one pass, when the kernels take it (x must be a temporary); False = not done, the caller runs
    RotaryEmbedding.rotate."""
    if x.dim() != 3 or not _fusable(x, cos, sin_signed):
        return False
    _lib().rotary_(x, cos.view(cos.shape[0], -1), sin_signed.view(sin_signed.shape[0], -1))
    return True


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [S, V] -> int64 [S], each row's first maximum (a NaN counts as the maximum), as
    `logits.argmax(dim=-1)`; compiled for float32 CPU rows (about 3x torch's reduction on the
    engine's [sequences, vocab] logits)."""
    if logits.dim() == 2 and logits.shape[1] > 0 and logits.dtype == torch.float32 and _fusable(logits):
        out = torch.empty(logits.shape[0], dtype=torch.int64)
        _lib().argmax_rows(out, logits)
        return out
    return logits.argmax(dim=-1)
