"""Hugging Face transformers `generate` on the same workload: the reference in every bench run.

Method (as vLLM's `benchmark_throughput --backend hf`): requests are taken in workload order in
batches of at most `batch_size`; each batch is left-padded with an attention mask and generated
greedily with max_new_tokens = min_new_tokens = the largest output length in the batch (so EOS
never ends a row early, like ignore_eos). Throughput counts only the tokens each request asked
for, exactly as for our engine; the extra tokens of shorter requests are the price of static
batching and are reported separately.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.bench.workload import BenchRequest


@dataclass
class HFResult:
    seconds: float
    output_tokens: int  # tokens the requests asked for
    generated_tokens: int  # including the padding-to-longest tokens of static batching
    token_ids: list[list[int]]  # per request, truncated to its output_len


def load_hf_model(model: Path, device: str, dtype: str) -> Any:
    from transformers import AutoModelForCausalLM

    ref: Any = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype))
    return ref.to(torch.device(device)).eval()


def run_hf_generate(ref: Any, requests: list[BenchRequest], batch_size: int, device: str) -> HFResult:
    cfg = ref.config
    eos = cfg.eos_token_id
    pad = int(eos if isinstance(eos, int) else (eos[0] if eos else 0))
    tokens: list[list[int]] = []
    generated = 0
    with torch.inference_mode():
        warm = torch.tensor([requests[0].prompt_ids], device=device)
        ref.generate(input_ids=warm, attention_mask=torch.ones_like(warm), max_new_tokens=2,
                     do_sample=False, pad_token_id=pad)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for start in range(0, len(requests), batch_size):
            batch = requests[start : start + batch_size]
            width = max(len(r.prompt_ids) for r in batch)
            new = max(r.output_len for r in batch)
            ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in batch], device=device)
            mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in batch],
                                device=device)
            out = ref.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                do_sample=False, pad_token_id=pad,
            )
            rows = out[:, width:].tolist()
            generated += sum(len(r) for r in rows)
            tokens.extend(row[: r.output_len] for row, r in zip(rows, batch, strict=True))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return HFResult(seconds, sum(r.output_len for r in requests), generated, tokens)
