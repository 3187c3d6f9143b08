"""Refusal budget: every refused request (a 4xx) costs its source; a source past its budget is
answered 429 ``refusal_budget_exceeded`` before anything else is done for it.

One token bucket per client address and one per key id: ``per_minute`` refusals fill it, and it
drains at ``per_minute / 60`` per second, so a steady trickle of mistakes never blocks a client
while a flood of 404s, 401s or 400s does within one request. Both tables are bounded
(least recently charged sources are forgotten first), so spoofed variety cannot grow memory.

API for the rest of the gateway (``app.state.refusals``):
- ``blocked(client, key_id) -> int | None``: seconds to wait, when either source is over budget.
- ``charge(client, key_id) -> bool``: count one refusal; True when the source is now over budget.
The edge middleware charges every 4xx response itself: to the key id when authentication set it
(``request.state.key_id``), else to the client address, so tenants sharing an address never spend
each other's budget; other code only needs ``blocked`` where it wants to stop early.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Bucket:
    level: float  # refusals counted and not yet drained
    at: float  # when level was last brought up to date


class RefusalBudget:
    def __init__(self, per_minute: int = 60, max_sources: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not isinstance(per_minute, int) or per_minute < 1:
            raise ValueError(f"refusal budget per_minute must be an integer >= 1, found {per_minute!r}")
        if not isinstance(max_sources, int) or max_sources < 1:
            raise ValueError(f"refusal budget max_sources must be an integer >= 1, found {max_sources!r}")
        self.per_minute = per_minute
        self.max_sources = max_sources
        self._rate = per_minute / 60.0  # drained per second
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()  # charged from the event loop and from worker threads

    def _level(self, source: str, now: float) -> float:
        bucket = self._buckets.get(source)
        if bucket is None:
            return 0.0
        bucket.level = max(0.0, bucket.level - (now - bucket.at) * self._rate)
        bucket.at = now
        return bucket.level

    def _wait(self, source: str, now: float) -> int | None:
        over = self._level(source, now) - (self.per_minute - 1)
        return None if over <= 0 else max(1, math.ceil(over / self._rate))

    def blocked(self, client: str | None, key_id: str | None = None) -> int | None:
        """Seconds until the source may be refused again, or None when it is within budget."""
        now = self._clock()
        with self._lock:
            waits = [w for s in _sources(client, key_id) if (w := self._wait(s, now)) is not None]
        return max(waits) if waits else None

    def charge(self, client: str | None, key_id: str | None = None) -> bool:
        """Count one refusal against the client address and the key id (either may be None)."""
        now = self._clock()
        over = False
        with self._lock:
            for source in _sources(client, key_id):
                level = self._level(source, now) + 1.0
                self._buckets[source] = _Bucket(level, now)
                self._buckets.move_to_end(source)
                over = over or level > self.per_minute - 1
            while len(self._buckets) > self.max_sources:
                self._buckets.popitem(last=False)
        return over

    def __len__(self) -> int:
        return len(self._buckets)


def _sources(client: str | None, key_id: str | None) -> list[str]:
    return [s for s in (f"addr:{client}" if client else None, f"key:{key_id}" if key_id else None) if s]
