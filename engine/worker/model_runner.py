"""Owns the device: loads the model, allocates the paged KV cache, runs one step."""

from __future__ import annotations

import os

import torch

from engine.config import EngineConfig
from engine.core.scheduler import ScheduledSeq
from engine.errors import ModelLoadError
from engine.model.config import ModelConfig
from engine.model.cpu_linear import pack_linears
from engine.model.loader import load_model
from engine.model.quant import quantize_model
from engine.ops.backend import get_backend
from engine.ops.reference import kv_cache_shape
from engine.worker.batch import ModelInput, build_model_input
from engine.worker.kv_budget import auto_kv_cache_bytes, lazy_zeros


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    # K and V, every layer: [block_size, num_kv_heads, head_dim]
    elem = dtype.itemsize
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem


def usable_cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def configure_cpu_threads(num_threads: int | None) -> int:
    """Intra-op threads: as asked, else OMP_NUM_THREADS if set, else every core we may run on."""
    if num_threads is None and os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    n = num_threads or usable_cpu_count()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        if self.device.type == "cpu":
            configure_cpu_threads(config.num_threads)
        self.model, self.model_config = load_model(
            config.model_path, config.torch_dtype, self.device, config.load_format
        )
        mc = self.model_config
        if config.quantization is not None:  # before packing: the quantized layers replace the oneDNN ones
            quantize_model(self.model, config.quantization)
        if self.device.type == "cpu" and config.cpu_packed_linear:
            pack_linears(self.model, batch_hint=min(config.max_num_seqs, config.max_num_batched_tokens))
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        if mc.sliding_window is not None:
            # Attention here is full-context; within the window the two are identical.
            self.max_model_len = min(self.max_model_len, mc.sliding_window)
        self.model.init_rotary(self.max_model_len, self.device)
        self.model.backend = get_backend(self.device, config.attention_backend)
        per_block = kv_bytes_per_block(mc, config.block_size, config.torch_dtype)
        auto = config.kv_cache_bytes is None
        self.kv_cache_bytes = (auto_kv_cache_bytes(config, mc, self.max_model_len, per_block, self.device)
                               if config.kv_cache_bytes is None else config.kv_cache_bytes)
        self.num_blocks = self.kv_cache_bytes // per_block
        if self.num_blocks < 1:
            where = " (auto: the memory left on the device)" if auto else ""
            raise ModelLoadError(
                f"kv_cache_bytes: expected at least one block ({per_block} bytes); "
                f"found {self.kv_cache_bytes}{where}"
            )
        shape = kv_cache_shape(self.num_blocks, config.block_size, mc.num_kv_heads, mc.head_dim)
        # Zero-filled so padded, never-written slots can't inject NaN into masked attention.
        # On CPU lazily committed (pages are taken when a block is first written).
        def zeros() -> torch.Tensor:
            if self.device.type == "cpu":
                return lazy_zeros(shape, config.torch_dtype)
            return torch.zeros(shape, dtype=config.torch_dtype, device=self.device)

        self.kv_caches = [(zeros(), zeros()) for _ in range(mc.num_layers)]
        self.graphs = None
        # Only the Triton backend is capturable: the torch path syncs with the host (slot checks)
        # and sizes its gathers from the batch, which a CUDA graph cannot replay.
        if self.device.type == "cuda" and config.cuda_graphs and self.model.backend.name == "triton":
            from engine.worker.cuda_graphs import DecodeGraphRunner

            self.graphs = DecodeGraphRunner(self.model, self.kv_caches, config, self.num_blocks, self.max_model_len)

    @torch.inference_mode()
    def execute(
        self, batch: list[ScheduledSeq]
    ) -> tuple[torch.Tensor, list[ScheduledSeq], list[tuple[ScheduledSeq, list[int]]]]:
        """Run one step. Returns float32 logits [S, V] for the sequences that sample, and them; and
        for each drafted chunk (speculative decoding) the greedy token after each of its rows."""
        inp = build_model_input(batch, self.config.block_size, self.device)
        hidden = self._forward(inp)
        logits = self.model.compute_logits(hidden[inp.logits_indices])
        verified: list[tuple[ScheduledSeq, list[int]]] = []
        if inp.spec is not None and inp.spec_indices is not None:
            greedy = self.model.compute_logits(hidden[inp.spec_indices]).argmax(dim=-1).tolist()
            at = 0
            for item in inp.spec:
                n = len(item.draft) + 1
                verified.append((item, greedy[at:at + n]))
                at += n
        return logits, inp.sampled, verified

    def _forward(self, inp: ModelInput) -> torch.Tensor:
        if self.graphs is not None and inp.meta.num_prefills == 0:
            hidden = self.graphs.run(inp)
            if hidden is not None:
                return hidden
        return self.model(inp.input_ids, inp.positions, self.kv_caches, inp.meta)
