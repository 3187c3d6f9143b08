"""Per-tenant request and token rate limits over a sliding one-minute window.

Limits come from the tenant's policy; state is per tenant, so one tenant's burst never spends
another tenant's budget.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

WINDOW_S = 60.0


@dataclass
class _Window:
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    reason: str = ""
    retry_after_s: int = 0


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()

    def _prune(self, win: _Window, now: float) -> None:
        while win.requests and now - win.requests[0] >= WINDOW_S:
            win.requests.popleft()
        while win.tokens and now - win.tokens[0][0] >= WINDOW_S:
            win.tokens.popleft()

    def check_and_record(self, tenant: str, rpm: int, tpm: int, tokens: int) -> RateDecision:
        """Admit one request that may use up to ``tokens`` tokens, or say when to retry."""
        now = self._clock()
        with self._lock:
            win = self._windows.setdefault(tenant, _Window())
            self._prune(win, now)
            if rpm > 0 and len(win.requests) >= rpm:
                wait = WINDOW_S - (now - win.requests[0])
                return RateDecision(
                    False, f"rate limit of {rpm} requests per minute reached", max(1, math.ceil(wait))
                )
            used = sum(n for _, n in win.tokens)
            if tpm > 0 and used + tokens > tpm:
                wait = WINDOW_S - (now - win.tokens[0][0]) if win.tokens else WINDOW_S
                return RateDecision(
                    False,
                    f"token limit of {tpm} tokens per minute reached ({used} used, {tokens} requested)",
                    max(1, math.ceil(wait)),
                )
            win.requests.append(now)
            win.tokens.append((now, tokens))
            return RateDecision(True)

    def settle(self, tenant: str, reserved: int, used: int) -> None:
        """Replace a reservation of ``reserved`` tokens by what the request really used."""
        with self._lock:
            win = self._windows.get(tenant)
            if win is None:
                return
            for i in range(len(win.tokens) - 1, -1, -1):
                ts, n = win.tokens[i]
                if n == reserved:
                    win.tokens[i] = (ts, used)
                    return
