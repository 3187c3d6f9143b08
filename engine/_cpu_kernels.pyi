# Signatures of the compiled extension (engine/csrc/module.cpp).
import torch

def paged_decode_attention(
    out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
    block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
) -> None: ...
def paged_prefill_attention(
    out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
    block_tables: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float,
) -> None: ...
def write_kv_cache(
    key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None: ...
def rms_norm(
    out: torch.Tensor, x: torch.Tensor, add: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> None: ...
def silu_and_mul(out: torch.Tensor, gate_up: torch.Tensor) -> None: ...
def rotary_(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> None: ...
