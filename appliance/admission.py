"""SLA admission control: refuse now rather than serve late, and never for another tenant's load.

Per node the gateway tracks the prompt tokens of admitted requests that have not produced their
first token yet, by tenant and SLA priority, and a moving estimate of the node's prefill rate
(prompt tokens per second, learned from observed time-to-first-token).

The prefill rate is learned from each request's first token as (tokens ahead of it when it was
admitted + its own) / TTFT: what the node got through while that request waited, so a busy node's
rate is not mistaken for a slow one's.

A new request of tenant T at priority p with P prompt tokens would wait for:

- all queued tokens of higher priority (lower number): they run first;
- T's own queued tokens at priority p, and its own P;
- of every other tenant U at priority p, at most ``min(queued_U, queued_T + P)``: with a fair
  share between tenants of one class, U cannot be served more than T before T's request is
  served. A flood from U thus counts against T only up to T's own share, never in full;
- nothing of lower priority.

That sum over the prefill rate is the TTFT estimate. Above the class's TTFT target (and with
something queued at all) the request is refused with ``Retry-After``. Until the first
measurement exists every request is admitted (nothing to base a refusal on).

Per-tenant caps on queued prompt tokens (``max_queued_tokens``) are checked here too, across all
nodes of this gateway.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from dataclasses import dataclass


@dataclass(frozen=True)
class AdmissionDecision:
    admitted: bool
    estimated_ttft_ms: float
    retry_after_s: int = 0
    reason: str = ""
    ahead_tokens: int = 0  # queued tokens this request waits for (pass back to first_token)


class AdmissionController:
    def __init__(self, smoothing: float = 0.2, max_queue_factor: float = 1.0) -> None:
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"smoothing must be in (0, 1], found {smoothing}")
        self._alpha = smoothing
        self._factor = max_queue_factor
        self._lock = threading.Lock()
        # node -> (priority, tenant) -> queued prompt tokens
        self._queued: dict[str, dict[tuple[int, str], int]] = defaultdict(dict)
        self._rate_tps: dict[str, float] = {}

    def _tenant_queued(self, tenant: str) -> int:
        return sum(n for q in self._queued.values() for (_, t), n in q.items() if t == tenant)

    def estimate_ms(self, node: str, tenant: str, priority: int, prompt_tokens: int) -> float:
        with self._lock:
            return self._estimate(node, tenant, priority, prompt_tokens)[0]

    def fresh_estimate_ms(self, node: str, tenant: str, priority: int, prompt_tokens: int) -> float:
        """The estimate for this request as if its tenant had nothing queued: what a tenant within
        its fair share would wait. Over the target too: the node is saturated, not the tenant."""
        with self._lock:
            return self._estimate(node, tenant, priority, prompt_tokens, own_queue=False)[0]

    def _estimate(self, node: str, tenant: str, priority: int, prompt_tokens: int,
                  own_queue: bool = True) -> tuple[float, int]:
        queue = self._queued.get(node, {})
        own = (queue.get((priority, tenant), 0) if own_queue else 0) + prompt_tokens
        ahead = own
        for (prio, other), tokens in queue.items():
            if prio < priority and (own_queue or other != tenant):
                ahead += tokens
            elif prio == priority and other != tenant:
                ahead += min(tokens, own)
        rate = self._rate_tps.get(node)
        estimate = 0.0 if rate is None or rate <= 0 else 1000.0 * ahead / rate
        return estimate, ahead - prompt_tokens

    def try_admit(self, node: str, tenant: str, priority: int, prompt_tokens: int, ttft_target_ms: int,
                  max_queued_tokens: int = 0) -> AdmissionDecision:
        with self._lock:
            if max_queued_tokens:
                queued = self._tenant_queued(tenant)
                if queued and queued + prompt_tokens > max_queued_tokens:
                    return AdmissionDecision(False, 0.0, 1, f"tenant queue limit of {max_queued_tokens} prompt tokens "
                                             f"reached ({queued} queued, {prompt_tokens} requested)")
            estimate_ms, waiting = self._estimate(node, tenant, priority, prompt_tokens)
            if estimate_ms > ttft_target_ms * self._factor and waiting > 0:
                excess_s = (estimate_ms - ttft_target_ms) / 1000.0
                return AdmissionDecision(False, estimate_ms, max(1, math.ceil(excess_s)))
            key = (priority, tenant)
            self._queued[node][key] = self._queued[node].get(key, 0) + prompt_tokens
            return AdmissionDecision(True, estimate_ms, ahead_tokens=waiting)

    def _dequeue(self, node: str, tenant: str, priority: int, prompt_tokens: int) -> None:
        queue = self._queued.get(node, {})
        left = queue.get((priority, tenant), 0) - prompt_tokens
        if left > 0:
            queue[(priority, tenant)] = left
        else:
            queue.pop((priority, tenant), None)

    def first_token(self, node: str, tenant: str, priority: int, prompt_tokens: int, ttft_s: float,
                    ahead_tokens: int = 0) -> None:
        """Record the first token of an admitted request: it leaves the queue, the rate is updated."""
        with self._lock:
            self._dequeue(node, tenant, priority, prompt_tokens)
            if ttft_s > 0 and prompt_tokens > 0:
                sample = (prompt_tokens + ahead_tokens) / ttft_s
                old = self._rate_tps.get(node)
                self._rate_tps[node] = sample if old is None else (1 - self._alpha) * old + self._alpha * sample

    def release(self, node: str, tenant: str, priority: int, prompt_tokens: int) -> None:
        """An admitted request ended before its first token (error or abort)."""
        with self._lock:
            self._dequeue(node, tenant, priority, prompt_tokens)

    def queued_tokens(self, node: str, tenant: str | None = None) -> int:
        with self._lock:
            return sum(n for (_, t), n in self._queued.get(node, {}).items() if tenant is None or t == tenant)
