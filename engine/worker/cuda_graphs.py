"""CUDA graphs for decode-only steps: one graph per padded batch size, replayed with static inputs.

A decode step launches hundreds of small kernels (per layer: norms, GEMMs, rope, KV write,
attention, combine); replaying a captured graph removes their launch cost. Inputs live in static
buffers sized for the largest captured batch; a step of n decodes runs the smallest graph of size
>= n with rows [n, size) padded: slot -1 (no KV write), context length 1, token 0. The attention
kernel sizes its splits from each sequence's own length, so one capture serves every context
length up to max_model_len.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.config import EngineConfig
from engine.model.llama import LlamaForCausalLM
from engine.ops.attention_metadata import AttentionMetadata
from engine.worker.batch import ModelInput

CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class DecodeGraphRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        config: EngineConfig,
        num_blocks: int,
        max_model_len: int,
        capture: bool = True,
    ) -> None:
        """capture=False runs the padded static-buffer path eagerly instead of replaying graphs
        (any device): tests check the padding logic on CPU with it."""
        self.model = model
        self.kv_caches = kv_caches
        device = torch.device(config.device)
        self.sizes = [s for s in CAPTURE_SIZES if s <= config.max_num_seqs] or [1]
        if self.sizes[-1] < config.max_num_seqs:
            self.sizes.append(config.max_num_seqs)
        max_bs = self.sizes[-1]
        width = -(-max_model_len // config.block_size)
        self.max_model_len = max_model_len
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.slots = torch.full((max_bs,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(max_bs, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_bs, width, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(max_bs, model.config.hidden_size, dtype=config.torch_dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool: Any = None  # the first graph's memory pool, shared by all
        self.capture = capture
        if capture:
            self._capture_all()

    def _meta(self, bs: int) -> AttentionMetadata:
        empty = self.seq_lens[:0]
        return AttentionMetadata(
            slot_mapping=self.slots[:bs], num_decode_tokens=bs, decode_seq_lens=self.seq_lens[:bs],
            decode_block_tables=self.block_tables[:bs], prefill_query_start_loc=self.seq_lens[:1],
            prefill_seq_lens=empty, prefill_block_tables=self.block_tables[:0],
            prefill_query_start_loc_host=[0], prefill_seq_lens_host=[],
            decode_max_seq_len=self.max_model_len,  # splits chosen for the longest possible context
        )

    def _run_model(self, bs: int) -> torch.Tensor:
        return self.model(self.input_ids[:bs], self.positions[:bs], self.kv_caches, self._meta(bs))

    @torch.inference_mode()
    def _capture_all(self) -> None:
        for bs in reversed(self.sizes):  # largest first: smaller graphs reuse its memory pool
            self._run_model(bs)  # warm-up: compiles the Triton kernels for this shape
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self._run_model(bs)
                self.hidden[:bs].copy_(out)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def run(self, inp: ModelInput) -> torch.Tensor | None:
        """Replay the graph for a decode-only step; None if the batch is larger than any graph."""
        n = inp.input_ids.shape[0]
        bs = next((s for s in self.sizes if s >= n), None)
        if bs is None:
            return None
        meta = inp.meta
        self.input_ids[:n].copy_(inp.input_ids)
        self.positions[:n].copy_(inp.positions)
        self.slots[:n].copy_(meta.slot_mapping)
        self.seq_lens[:n].copy_(meta.decode_seq_lens)
        width = meta.decode_block_tables.shape[1]
        self.block_tables[:n, :width].copy_(meta.decode_block_tables)
        if bs > n:
            self.input_ids[n:bs].zero_()
            self.positions[n:bs].zero_()
            self.slots[n:bs].fill_(-1)
            self.seq_lens[n:bs].fill_(1)
        if self.capture:
            self.graphs[bs].replay()
        else:
            with torch.inference_mode():
                self.hidden[:bs].copy_(self._run_model(bs))
        return self.hidden[:n]
