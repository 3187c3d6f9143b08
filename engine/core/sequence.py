"""Per-request state: tokens, progress through the KV cache, block table and output bookkeeping."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch

from engine.sampling_params import SamplingParams
from engine.tokenizer.detokenizer import IncrementalDetokenizer

_arrival_counter = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    cache_salt: str | None = None
    priority: int = 0  # lower runs first
    deadline: float | None = None  # absolute time.time() deadline; earliest first within a priority
    arrival_time: float = field(default_factory=time.monotonic)
    arrival_index: int = field(default_factory=lambda: next(_arrival_counter))
    max_total_tokens: int = 0  # prompt + output cap (min of max_model_len and prompt + max_tokens)
    tenant: str | None = None  # fair share between tenants of one priority (engine.core.fairness)
    tpot_target_s: float | None = None  # time per output token it should see: caps steps' token counts
    priority_boost: int = 0  # classes gained by waiting (aging); never shrinks, kept while running

    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of full token blocks
    num_cached_tokens: int = 0  # prefix-cache hit at the last admission
    num_preemptions: int = 0
    num_prompt_tokens_charged: int = 0  # prompt tokens already counted as served (recompute is free)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[dict[int, float]] | None = None
    generator: torch.Generator | None = None
    # what has been handed to the caller (streaming)
    _emitted_tokens: int = 0
    _emitted_logprobs: int = 0

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_at(self, pos: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[pos] if pos < n else self.output_token_ids[pos - n]

    def token_slice(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without building all_token_ids."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def effective_priority(self) -> int:
        """The class it is scheduled in: its priority raised by aging, never above class 0 (or its
        own priority when that is already below 0)."""
        return max(self.priority - self.priority_boost, min(self.priority, 0))

    @property
    def deadline_key(self) -> float:
        return self.deadline if self.deadline is not None else float("inf")

    def sort_key(self) -> tuple[int, bool, float, int]:
        """Scheduling order: effective priority, then a preempted request before the others of its
        class (it keeps its place), then earliest deadline, then arrival (FCFS)."""
        return (self.effective_priority, self.num_preemptions == 0, self.deadline_key, self.arrival_index)

    def take_new_tokens(self) -> list[int]:
        new = self.output_token_ids[self._emitted_tokens :]
        self._emitted_tokens = len(self.output_token_ids)
        return new

    def take_new_logprobs(self) -> list[dict[int, float]] | None:
        if self.logprobs is None:
            return None
        new = self.logprobs[self._emitted_logprobs :]
        self._emitted_logprobs = len(self.logprobs)
        return new
