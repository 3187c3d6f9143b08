"""SLA admission control: refuse now rather than serve late.

The gateway tracks, per node, the prompt tokens of requests that have been admitted but have not
yet produced their first token, and a moving estimate of the node's prefill rate (prompt tokens per
second, learned from observed time-to-first-token). A new request's TTFT is estimated as the queued
prompt tokens ahead of it plus its own, divided by that rate. If the estimate exceeds the SLA
class's TTFT target the request is refused with a ``Retry-After`` of the expected drain time.
Until the first measurement exists every request is admitted (nothing to base a refusal on).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class AdmissionDecision:
    admitted: bool
    estimated_ttft_ms: float
    retry_after_s: int = 0


class AdmissionController:
    def __init__(self, smoothing: float = 0.2, max_queue_factor: float = 1.0) -> None:
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"smoothing must be in (0, 1], found {smoothing}")
        self._alpha = smoothing
        self._factor = max_queue_factor
        self._lock = threading.Lock()
        self._queued_tokens: dict[str, int] = {}
        self._rate_tps: dict[str, float] = {}

    def try_admit(self, node: str, prompt_tokens: int, ttft_target_ms: int) -> AdmissionDecision:
        with self._lock:
            queued = self._queued_tokens.get(node, 0)
            rate = self._rate_tps.get(node)
            if rate is None or rate <= 0:
                estimate_ms = 0.0
            else:
                estimate_ms = 1000.0 * (queued + prompt_tokens) / rate
            if estimate_ms > ttft_target_ms * self._factor and queued > 0:
                excess_s = (estimate_ms - ttft_target_ms) / 1000.0
                return AdmissionDecision(False, estimate_ms, max(1, math.ceil(excess_s)))
            self._queued_tokens[node] = queued + prompt_tokens
            return AdmissionDecision(True, estimate_ms)

    def first_token(self, node: str, prompt_tokens: int, ttft_s: float) -> None:
        """Record the first token of an admitted request: it leaves the queue, the rate is updated."""
        with self._lock:
            self._queued_tokens[node] = max(0, self._queued_tokens.get(node, 0) - prompt_tokens)
            if ttft_s > 0 and prompt_tokens > 0:
                sample = prompt_tokens / ttft_s
                old = self._rate_tps.get(node)
                self._rate_tps[node] = sample if old is None else (1 - self._alpha) * old + self._alpha * sample

    def release(self, node: str, prompt_tokens: int) -> None:
        """An admitted request ended before its first token (error or abort)."""
        with self._lock:
            self._queued_tokens[node] = max(0, self._queued_tokens.get(node, 0) - prompt_tokens)

    def queued_tokens(self, node: str) -> int:
        with self._lock:
            return self._queued_tokens.get(node, 0)
