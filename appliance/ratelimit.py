"""Per-tenant request and token rate limits over a sliding one-minute window, and concurrency.

Limits come from the tenant's policy; state is per tenant, so one tenant's burst never spends
another tenant's budget. The gateway uses it in two steps:

1. ``enter`` before any work (parsing aside): a cheap check that the tenant has a request left in
   this minute, and one of its concurrent slots taken (``leave`` gives it back);
2. ``reserve`` once the request is admitted: counts the request and reserves its prompt tokens
   plus its ``max_tokens`` against tokens-per-minute, returning a ticket; ``settle(ticket, used)``
   replaces the reservation by what the request really used. A refused request takes nothing of
   either budget (floods of refusals are the refusal budget's business, appliance/gateway/refusals.py).

This class keeps the state in this process's memory: the contract, and the reference the tests hold
the shared limiter to. The gateway uses ``appliance.limit_leases.SharedRateLimiter``, the same
contract with the budgets in the database, so that every gateway process and host sharing it
holds one limit per tenant (its ``enter`` and ``reserve`` are coroutines).
"""

from __future__ import annotations

import contextlib
import itertools
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
    tokens: dict[int, tuple[float, int]] = field(default_factory=dict)  # ticket -> (time, tokens), oldest first
    used: int = 0  # the sum of ``tokens``: kept, not recounted per request
    in_flight: int = 0


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    reason: str = ""
    retry_after_s: int = 0
    code: str = "rate_limit_exceeded"
    ticket: int = 0


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()
        self._tickets = itertools.count(1)
        self._owner: dict[int, str] = {}

    def _window(self, tenant: str, now: float) -> _Window:
        win = self._windows.setdefault(tenant, _Window())
        while win.requests and now - win.requests[0] >= WINDOW_S:
            win.requests.popleft()
        while win.tokens:  # in reservation order: only the expired head is visited
            ticket, (ts, n) = next(iter(win.tokens.items()))
            if now - ts < WINDOW_S:
                break
            del win.tokens[ticket]
            win.used -= n
            self._owner.pop(ticket, None)
        return win

    def _rpm_refusal(self, win: _Window, rpm: int, now: float) -> RateDecision | None:
        if rpm > 0 and len(win.requests) >= rpm:
            wait = WINDOW_S - (now - win.requests[0])
            return RateDecision(False, f"rate limit of {rpm} requests per minute reached", max(1, math.ceil(wait)))
        return None

    def enter(self, tenant: str, rpm: int, max_concurrent: int = 0) -> RateDecision:
        """Check that a request is left this minute and take a concurrency slot (``leave`` returns it)."""
        now = self._clock()
        with self._lock:
            win = self._window(tenant, now)
            refused = self._rpm_refusal(win, rpm, now)
            if refused is not None:
                return refused
            if max_concurrent > 0 and win.in_flight >= max_concurrent:
                return RateDecision(False, f"concurrency limit of {max_concurrent} requests in flight reached",
                                    1, "concurrency_limit_exceeded")
            win.in_flight += 1
            return RateDecision(True)

    def leave(self, tenant: str) -> None:
        with self._lock:
            win = self._windows.get(tenant)
            if win is not None:
                win.in_flight = max(0, win.in_flight - 1)

    def in_flight(self, tenant: str) -> int:
        with self._lock:
            win = self._windows.get(tenant)
            return win.in_flight if win else 0

    def reserve(self, tenant: str, tpm: int, tokens: int, rpm: int = 0) -> RateDecision:
        """Count one admitted request and reserve up to ``tokens`` tokens of the per-minute budget."""
        now = self._clock()
        with self._lock:
            win = self._window(tenant, now)
            refused = self._rpm_refusal(win, rpm, now)
            if refused is not None:
                return refused
            used = win.used
            if tpm > 0 and used + tokens > tpm:
                wait = WINDOW_S - (now - next(iter(win.tokens.values()))[0]) if win.tokens else WINDOW_S
                return RateDecision(
                    False, f"token limit of {tpm} tokens per minute reached ({used} used, {tokens} requested)",
                    max(1, math.ceil(wait)))
            ticket = next(self._tickets)
            win.requests.append(now)
            win.tokens[ticket] = (now, tokens)
            win.used += tokens
            self._owner[ticket] = tenant
            return RateDecision(True, ticket=ticket)

    def settle(self, ticket: int, used: int) -> None:
        """Replace the reservation ``ticket`` by the tokens the request really used."""
        with self._lock:
            tenant = self._owner.get(ticket)
            win = self._windows.get(tenant) if tenant else None
            if win is not None and ticket in win.tokens:
                ts, reserved = win.tokens[ticket]
                win.tokens[ticket] = (ts, used)  # keeps its place: reservation order
                win.used += used - reserved

    def cancel(self, ticket: int) -> None:
        """Take back a reservation whose request was refused after it (its request and tokens)."""
        with self._lock:
            tenant = self._owner.pop(ticket, None)
            win = self._windows.get(tenant) if tenant else None
            if win is not None and ticket in win.tokens:
                ts, reserved = win.tokens.pop(ticket)
                win.used -= reserved
                with contextlib.suppress(ValueError):
                    win.requests.remove(ts)
