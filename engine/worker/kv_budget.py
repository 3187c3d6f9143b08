"""How much memory the paged KV cache gets when EngineConfig.kv_cache_bytes is None (auto).

CPU: a quarter of the memory available when the engine starts, at most CPU_KV_CAP (vLLM's CPU
default is 4 GiB as well). The cache is lazily zeroed anonymous memory, so pages are committed
only when a block is first written: a large budget costs nothing until it is used.

CUDA: GPU_MEMORY_UTILIZATION of the device's memory, minus what is in use after the weights are
loaded (by us or anyone else) and an estimate of the peak activations of one step.

Either way the budget is never more than max_num_seqs full-length sequences need.
"""

from __future__ import annotations

import math
import mmap
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.model.config import ModelConfig

CPU_KV_CAP = 4 * 1024**3
CPU_KV_FRACTION = 0.25
GPU_MEMORY_UTILIZATION = 0.9


def mem_available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def activation_bytes(mc: ModelConfig, config: EngineConfig, elem: int) -> int:
    """Generous peak of one step's temporaries: hidden states, fused projections, fp32 logits."""
    tokens = config.max_num_batched_tokens
    per_token = (8 * mc.hidden_size + 3 * mc.intermediate_size
                 + (mc.num_heads + 2 * mc.num_kv_heads) * mc.head_dim) * elem
    logits = 3 * config.max_num_seqs * mc.vocab_size * 4
    return 2 * (tokens * per_token + logits)


def gpu_kv_budget(free: int, total: int, activations: int) -> int:
    """GPU_MEMORY_UTILIZATION of total, less everything in use now (total - free) and activations."""
    return int(total * GPU_MEMORY_UTILIZATION) - (total - free) - activations


def auto_kv_cache_bytes(config: EngineConfig, mc: ModelConfig, max_model_len: int, per_block: int,
                        device: torch.device) -> int:
    blocks_needed = config.max_num_seqs * math.ceil(max_model_len / config.block_size)
    need = blocks_needed * per_block
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = gpu_kv_budget(free, total, activation_bytes(mc, config, config.torch_dtype.itemsize))
    else:
        avail = mem_available_bytes()
        budget = CPU_KV_CAP if avail is None else min(CPU_KV_CAP, int(avail * CPU_KV_FRACTION))
    return max(0, min(budget, need))


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor on CPU backed by anonymous memory: pages are committed when first written."""
    count = math.prod(shape)
    buf = mmap.mmap(-1, max(count * dtype.itemsize, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(buf, dtype=dtype, count=count).view(shape)
