"""transformers given its best shot (issue 19): static batch sizes swept, with and without batches of
length-sorted requests; the best setting is the one with the highest median output tokens/s."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from engine.bench.hf_reference import run_hf_generate
from engine.bench.workload import BenchRequest

DEFAULT_BATCH_SIZES = (1, 8, 16, 32, 64)


@dataclass(frozen=True)
class HFSetting:
    batch_size: int
    sorted_by_length: bool

    @property
    def name(self) -> str:
        return f"batch {self.batch_size}" + (", length-sorted" if self.sorted_by_length else "")


def sweep_settings(batch_sizes: tuple[int, ...] | list[int], num_requests: int) -> list[HFSetting]:
    """Every distinct setting: batch sizes above the request count run the same batches as the request
    count itself, so they are capped (and de-duplicated); at batch 1 sorting changes nothing."""
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be positive integers; got {list(batch_sizes)}")
    sizes = sorted({min(b, num_requests) for b in batch_sizes})
    out = []
    for b in sizes:
        out.append(HFSetting(b, False))
        if b > 1:
            out.append(HFSetting(b, True))
    return out


def run_setting(ref: Any, requests: list[BenchRequest], setting: HFSetting, device: str) -> dict[str, Any]:
    """One run; token ids come back in workload order whatever the batching order."""
    order = list(range(len(requests)))
    if setting.sorted_by_length:
        order.sort(key=lambda i: (len(requests[i].prompt_ids), requests[i].output_len))
    res = run_hf_generate(ref, [requests[i] for i in order], setting.batch_size, device)
    tokens: list[list[int]] = [[] for _ in requests]
    for pos, i in enumerate(order):
        tokens[i] = res.token_ids[pos]
    return {"setting": setting.name, "tokens_per_s": res.output_tokens / res.seconds, "seconds": res.seconds,
            "generated_tokens": res.generated_tokens, "token_ids": tokens}


def pick_best(runs: dict[str, list[float]]) -> tuple[str, float]:
    """`runs` maps a setting's name to its tokens/s per repeat; returns (name, median) of the best."""
    if not runs or any(not v for v in runs.values()):
        raise ValueError("pick_best needs at least one setting with at least one measured run")
    medians = {name: statistics.median(v) for name, v in runs.items()}
    best = max(medians, key=lambda n: medians[n])
    return best, medians[best]


def hf_single_stream(ref: Any, prompt_ids: list[int], n_tokens: int, device: str) -> dict[str, float]:
    """Decode time per token at batch 1: generate(n) minus generate(1) from the same prompt (the
    difference leaves out the prompt's prefill), over n - 1 tokens."""
    eos = ref.config.eos_token_id
    pad = int(eos if isinstance(eos, int) else (eos[0] if eos else 0))
    ids = torch.tensor([prompt_ids], device=device)

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                     do_sample=False, pad_token_id=pad)
        return time.perf_counter() - t0

    with torch.inference_mode():
        timed(2)
        one = min(timed(1) for _ in range(3))
        full = timed(n_tokens)
    seconds = max(full - one, 1e-9)
    return {"tokens": n_tokens - 1, "ms_per_token": 1000 * seconds / (n_tokens - 1),
            "tokens_per_s": (n_tokens - 1) / seconds}
