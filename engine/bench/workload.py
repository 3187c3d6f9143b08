"""Seeded synthetic workloads: random token prompts and output lengths, as in vLLM's random dataset."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class BenchRequest:
    prompt_ids: list[int]
    output_len: int  # exact number of tokens generated (ignore_eos, min_tokens = max_tokens)


@dataclass(frozen=True)
class WorkloadSpec:
    num_prompts: int = 64
    input_len_min: int = 16
    input_len_max: int = 256
    output_len_min: int = 16
    output_len_max: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1; got {self.num_prompts}")
        if not 1 <= self.input_len_min <= self.input_len_max:
            raise ValueError(
                f"input lengths must satisfy 1 <= min <= max; got {self.input_len_min}..{self.input_len_max}"
            )
        if not 1 <= self.output_len_min <= self.output_len_max:
            raise ValueError(
                f"output lengths must satisfy 1 <= min <= max; got {self.output_len_min}..{self.output_len_max}"
            )

    def describe(self) -> str:
        return (f"{self.num_prompts} requests, prompt len U[{self.input_len_min},{self.input_len_max}], "
                f"output len U[{self.output_len_min},{self.output_len_max}], seed {self.seed}, ignore_eos")


def make_workload(spec: WorkloadSpec, vocab_size: int, reserved_low_ids: int = 256) -> list[BenchRequest]:
    """Prompts of uniformly random ordinary token ids (ids below reserved_low_ids hold specials)."""
    rng = random.Random(spec.seed)
    low = min(reserved_low_ids, vocab_size // 2)
    out = []
    for _ in range(spec.num_prompts):
        n_in = rng.randint(spec.input_len_min, spec.input_len_max)
        n_out = rng.randint(spec.output_len_min, spec.output_len_max)
        out.append(BenchRequest([rng.randrange(low, vocab_size) for _ in range(n_in)], n_out))
    return out


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]; 0.0 for no values."""
    if not values:
        return 0.0
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
