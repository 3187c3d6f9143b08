"""Offline throughput: the whole workload through `LLM.generate` (continuous batching)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from engine.bench.workload import BenchRequest
from engine.sampling_params import SamplingParams


@dataclass
class OfflineResult:
    seconds: float
    output_tokens: int
    prompt_tokens: int
    token_ids: list[list[int]]
    num_steps: int


def exact_length_params(req: BenchRequest) -> SamplingParams:
    """Greedy, exactly output_len tokens: EOS is banned until then, like HF's min_new_tokens."""
    return SamplingParams(temperature=0.0, max_tokens=req.output_len, min_tokens=req.output_len)


def run_offline(llm: Any, requests: list[BenchRequest]) -> OfflineResult:
    """`llm` is an engine.LLM; a short warm-up runs first so lazy initialisation is not timed."""
    llm.generate([requests[0].prompt_ids[:8]], SamplingParams(temperature=0.0, max_tokens=2))
    steps_before = llm.stats()["num_steps"]
    sync = torch.cuda.synchronize if llm.config.device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    outs = llm.generate([r.prompt_ids for r in requests], [exact_length_params(r) for r in requests])
    sync()
    seconds = time.perf_counter() - t0
    return OfflineResult(
        seconds=seconds,
        output_tokens=sum(len(o.token_ids) for o in outs),
        prompt_tokens=sum(len(r.prompt_ids) for r in requests),
        token_ids=[o.token_ids for o in outs],
        num_steps=int(llm.stats()["num_steps"]) - int(steps_before),
    )
