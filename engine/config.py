"""Engine configuration, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

QUANTIZATIONS = (None, "int8", "int4")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EngineConfig:
    model: str | Path
    device: str = "cpu"
    dtype: str = "float32"
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # per-step token budget (decodes + prefill chunks)
    # memory budget for the paged KV cache; None = sized from the device (see worker.kv_budget)
    kv_cache_bytes: int | None = None
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"  # "auto" | "cpu" (compiled CPU kernels) | "torch" | "triton"
    check_integrity: bool = False  # run BlockManager.check_integrity() after every step (tests)
    load_format: str = "auto"  # "auto": safetensors; "dummy": random weights of config.json's shape (benchmarks)
    num_threads: int | None = None  # CPU: torch intra-op threads; None = the cores this process may use
    cuda_graphs: bool = True  # CUDA with the Triton backend: replay captured graphs for decode-only steps
    cpu_packed_linear: bool = True  # CPU fp32/bf16: oneDNN GEMMs on weights pre-packed at load
    scheduling: str = "sla"  # "sla" | "fcfs" (arrival order only: the SLA benchmark's baseline)
    max_wait_s: float | None = 10.0  # aging step (engine/core/scheduling_policy.py); None = no aging
    # weight-only quantization of the linear layers at load: None (as stored, or as the model's
    # config says) | "int8" | "int4" (group-wise); a model imported with --quantize is already quantized
    quantization: str | None = None
    # prompt-lookup (n-gram) speculative decoding: draft up to this many tokens per step; 0 = off
    speculative_tokens: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}; got {self.dtype!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]'; got {self.device!r}")
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be a power of two in [1, 128]; got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1; got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1; got {self.max_num_batched_tokens}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < 1:
            raise ValueError(f"kv_cache_bytes must be None (auto) or >= 1; got {self.kv_cache_bytes}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be None or >= 2; got {self.max_model_len}")
        if self.attention_backend not in ("auto", "cpu", "torch", "triton"):
            raise ValueError(
                f"attention_backend must be 'auto', 'cpu', 'torch' or 'triton'; got {self.attention_backend!r}"
            )
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy'; got {self.load_format!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be None or >= 1; got {self.num_threads}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {list(QUANTIZATIONS)}; got {self.quantization!r}")
        if not isinstance(self.speculative_tokens, int) or not 0 <= self.speculative_tokens <= 16:
            raise ValueError(
                f"speculative_tokens must be an integer in [0, 16] (0 = off); got {self.speculative_tokens!r}")
        from engine.core.scheduling_policy import SchedulingPolicy

        SchedulingPolicy(mode=self.scheduling, max_wait_s=self.max_wait_s)  # a clear ValueError when wrong

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def model_path(self) -> Path:
        return Path(self.model)
