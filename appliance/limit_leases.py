"""Tenant rate limits held across every gateway process and host that shares the database.

``SharedRateLimiter`` keeps ``RateLimiter``'s contract (appliance/ratelimit.py: a sliding one-minute
window of requests and tokens, concurrency slots, ``reserve`` of prompt + ``max_tokens`` settled to
what was used, ``cancel`` of a request refused after its reservation, the same refusal reasons,
codes and Retry-After) but the budgets live in the database (appliance/limit_ledger.py), so two
gateways never each let a tenant do N per minute.

No request waits for the database when it need not. A process holds, per tenant, a *lease*: a slice
of the requests and tokens per minute granted by one transaction, and a number of concurrency slots.
``enter`` and ``reserve`` take from them in memory; only when the lease cannot serve the request do
they ask the ledger, in a worker thread (they are coroutines; the event loop never runs a query).
Leases are large while the tenant is far from its limit and exactly one request's worth near it
(``limit_ledger.share``), so the total accepted is exactly the limit. A lease may be used for
``lease_s`` (1 s); a background thread then gives back what was not used, writes settlements and
cancellations, returns surplus slots (at once near the limit, after a lease's life far from it), and
keeps the holder's heartbeat. ``leave``, ``settle`` and ``cancel`` only touch memory. Everything
goes back late, never early: late is conservative.

Why this is the in-memory limiter's window: a lease row counts in full while it may be used and,
once given back, what was used of it counts until one window after its last use. So every request
counts for at least the 60 s after it was taken; the last request of a lease counts exactly that,
earlier ones up to ``lease_s`` longer (near the limit a lease is one request, taken at once: exact).
A refused request never holds budget: ``enter`` only leases, ``reserve`` counts, ``cancel`` gives
back. Tokens are settled per request (a ticket names the lease it was charged to).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import sqlalchemy as sa

from appliance.errors import ApplianceError
from appliance.limit_ledger import GrantAsk, LeaseLedger, RowWrite
from appliance.ratelimit import WINDOW_S, RateDecision

log = logging.getLogger(__name__)

ALLOWED = RateDecision(True)
COLLECT_EVERY_S = 10.0  # how often a holder deletes a tenant's expired rows and dead holders
ROUNDS = 8  # grants a request may wait for when other requests of this process take each one first


class LimitsUnavailable(ApplianceError):
    """The database that holds the tenant limits could not be reached: the request is refused."""


def _limits(**values: object) -> None:
    """Limits and token counts are ints >= 0 (a limit of 0 is no limit, as in the policy)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            meaning = "" if name in ("tokens", "used") else " (0 = no limit)"
            raise ValueError(f"tenant limits: {name}: expected an int >= 0{meaning}, found {value!r}")


@dataclass(eq=False)
class _Lease:
    row: int
    requests: int  # granted
    tokens: int
    granted_at: float  # the ledger's clock
    started: float  # the local clock just before the grant's transaction
    usable_until: float  # the local clock
    written: RowWrite
    used_requests: int = 0
    used_tokens: int = 0  # reserved by tickets, then settled
    last_use: float | None = None
    open: bool = True
    tickets: set[int] = field(default_factory=set)

    def values(self, life_s: float) -> RowWrite:
        if self.open:  # the whole lease counts while it may be used
            return RowWrite(self.row, max(self.requests, self.used_requests), max(self.tokens, self.used_tokens),
                            self.granted_at + life_s + WINDOW_S)
        if self.used_requests <= 0 and self.used_tokens <= 0:
            return RowWrite(self.row, 0, 0, 0.0)
        # what was used counts until a window after the last use (on the ledger's clock)
        since = (self.last_use if self.last_use is not None else self.started) - self.started
        return RowWrite(self.row, max(0, self.used_requests), max(0, self.used_tokens),
                        self.granted_at + since + WINDOW_S)


@dataclass(eq=False)
class _Tenant:
    open: _Lease | None = None
    closed: list[_Lease] = field(default_factory=list)
    in_flight: int = 0
    slots: int = 0  # concurrency slots held (what the ledger has, or less while a return is unwritten)
    slots_written: int = 0
    keep_slots_until: float = -math.inf  # surplus slots of a grant made far from the limit are kept until then
    beat_at: float = -math.inf
    collected_at: float = -math.inf
    tpm: int = 0  # the last tokens-per-minute limit seen, for leases that ``enter`` asks for


@dataclass(frozen=True)
class _Ticket:
    tenant: str
    lease: _Lease
    tokens: int


class SharedRateLimiter:
    def __init__(self, engine: sa.Engine, *, holder: str | None = None, clock: Callable[[], float] | None = None,
                 lease_s: float = 1.0, flush_interval_s: float = 0.15, holder_expiry_s: float = 30.0,
                 workers: int = 4, background: bool = True) -> None:
        """``clock`` (tests): one clock for the leases and the ledger instead of the monotonic clock
        here and the database's (or this host's wall clock on SQLite). ``holder_expiry_s``: a
        holder silent for this long is dead and its slots are given to others; ``background``:
        False runs no flusher thread (call ``flush``)."""
        for name, value in (("lease_s", lease_s), ("flush_interval_s", flush_interval_s),
                            ("holder_expiry_s", holder_expiry_s)):
            if not value > 0:
                raise ValueError(f"{name}: expected seconds > 0, found {value!r}")
        self.holder = holder or f"{socket.gethostname()[:64]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._ledger = LeaseLedger(engine, self.holder, window_s=WINDOW_S, holder_expiry_s=holder_expiry_s,
                                   clock=clock)
        self._clock = clock or time.monotonic
        self._life = lease_s
        self._beat_every = holder_expiry_s / 6
        self._lock = threading.Lock()  # guards the state below; never held across a query
        self._tenants: dict[str, _Tenant] = {}
        self._turns: dict[str, threading.Lock] = {}  # one transaction per tenant at a time here
        self._async_turns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]] = \
            weakref.WeakKeyDictionary()
        self._tickets: dict[int, _Ticket] = {}
        self._ids = itertools.count(1)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tenant-limits")
        self._stop = threading.Event()
        self._closed = False
        self._flusher: threading.Thread | None = None
        if background:
            self._flusher = threading.Thread(target=self._flush_forever, args=(flush_interval_s,),
                                             name="tenant-limits-flush", daemon=True)
            self._flusher.start()

    # ---- the request path ---------------------------------------------------------------------
    async def enter(self, tenant: str, rpm: int, max_concurrent: int = 0) -> RateDecision:
        """Check that a request is left this minute and take a concurrency slot (``leave`` returns it)."""
        _limits(rpm=rpm, max_concurrent=max_concurrent)
        return await self._run(tenant, lambda st: self._enter_here(st, rpm, max_concurrent),
                               lambda: self._acquire(tenant, rpm, 0, None, max_concurrent))

    async def reserve(self, tenant: str, tpm: int, tokens: int, rpm: int = 0) -> RateDecision:
        """Count one admitted request and reserve up to ``tokens`` tokens of the per-minute budget."""
        _limits(tpm=tpm, tokens=tokens, rpm=rpm)
        return await self._run(tenant, lambda st: self._reserve_here(tenant, st, tpm, tokens, rpm),
                               lambda: self._acquire(tenant, rpm, tpm, tokens, 0))

    def enter_blocking(self, tenant: str, rpm: int, max_concurrent: int = 0) -> RateDecision:
        """``enter`` for a caller on a thread of its own (never on an event loop)."""
        _limits(rpm=rpm, max_concurrent=max_concurrent)
        return self._run_blocking(tenant, lambda st: self._enter_here(st, rpm, max_concurrent),
                                  lambda: self._acquire(tenant, rpm, 0, None, max_concurrent))

    def reserve_blocking(self, tenant: str, tpm: int, tokens: int, rpm: int = 0) -> RateDecision:
        """``reserve`` for a caller on a thread of its own (never on an event loop)."""
        _limits(tpm=tpm, tokens=tokens, rpm=rpm)
        return self._run_blocking(tenant, lambda st: self._reserve_here(tenant, st, tpm, tokens, rpm),
                                  lambda: self._acquire(tenant, rpm, tpm, tokens, 0))

    def leave(self, tenant: str) -> None:
        with self._lock:
            st = self._tenants.get(tenant)
            if st is not None:
                st.in_flight = max(0, st.in_flight - 1)

    def in_flight(self, tenant: str) -> int:
        """This process's requests of ``tenant`` in flight."""
        with self._lock:
            st = self._tenants.get(tenant)
            return st.in_flight if st else 0

    def settle(self, ticket: int, used: int) -> None:
        """Replace the reservation ``ticket`` by the tokens the request really used (once)."""
        _limits(used=used)
        with self._lock:
            held = self._tickets.pop(ticket, None)
            if held is not None:
                held.lease.used_tokens += used - held.tokens
                held.lease.tickets.discard(ticket)

    def cancel(self, ticket: int) -> None:
        """Take back a reservation whose request was refused after it (its request and tokens)."""
        with self._lock:
            held = self._tickets.pop(ticket, None)
            if held is not None:
                held.lease.used_requests -= 1
                held.lease.used_tokens -= held.tokens
                held.lease.tickets.discard(ticket)

    def totals(self, tenant: str) -> tuple[int, int, int]:
        """(requests, tokens) counted in ``tenant``'s window by every gateway, and their slots held."""
        return self._ledger.totals(tenant)

    # ---- the local fast path (under self._lock) --------------------------------------------------
    def _state(self, tenant: str) -> _Tenant:
        st = self._tenants.get(tenant)
        if st is None:
            st = self._tenants[tenant] = _Tenant()
            self._turns[tenant] = threading.Lock()
        return st

    def _usable(self, st: _Tenant, tokens: int, rpm: int, tpm: int) -> _Lease | None:
        lease = st.open
        if lease is None or self._clock() >= lease.usable_until:
            return None
        if rpm > 0 and lease.requests - lease.used_requests < 1:
            return None
        if tpm > 0 and lease.tokens - lease.used_tokens < tokens:
            return None
        return lease

    def _enter_here(self, st: _Tenant, rpm: int, max_concurrent: int) -> bool:
        if rpm > 0 and self._usable(st, 0, rpm, 0) is None:
            return False
        if max_concurrent > 0 and st.in_flight >= min(st.slots, max_concurrent):
            return False
        st.in_flight += 1
        return True

    def _reserve_here(self, tenant: str, st: _Tenant, tpm: int, tokens: int, rpm: int) -> int:
        st.tpm = tpm
        lease = None
        if rpm > 0 or tpm > 0:
            lease = self._usable(st, tokens, rpm, tpm)
            if lease is None:
                return 0
            lease.used_requests += 1
            lease.used_tokens += tokens
            lease.last_use = self._clock()
        ticket = next(self._ids)
        if lease is not None:  # without limits there is nothing to settle or cancel
            self._tickets[ticket] = _Ticket(tenant, lease, tokens)
            lease.tickets.add(ticket)
        return ticket

    async def _run(self, tenant: str, here: Callable[[_Tenant], bool | int],
                   acquire: Callable[[], RateDecision | None]) -> RateDecision:
        with self._lock:
            done = here(self._state(tenant))
        if done:
            return RateDecision(True, ticket=int(done) if done is not True else 0)
        loop = asyncio.get_running_loop()
        with self._lock:
            turns = self._async_turns.setdefault(loop, {})
            turn = turns.setdefault(tenant, asyncio.Lock())
        for _ in range(ROUNDS):
            async with turn:  # one grant in flight per tenant: the others wait and then take from it
                with self._lock:
                    done = here(self._state(tenant))
                if not done:
                    if self._closed:  # the pool is shut down
                        raise LimitsUnavailable("tenant limits: the limiter is closed; request refused")
                    refused = await loop.run_in_executor(self._pool, acquire)
                    if refused is not None:
                        return refused
                    with self._lock:
                        done = here(self._state(tenant))
            if done:
                return RateDecision(True, ticket=int(done) if done is not True else 0)
        return self._busy(tenant)

    def _run_blocking(self, tenant: str, here: Callable[[_Tenant], bool | int],
                      acquire: Callable[[], RateDecision | None]) -> RateDecision:
        for _ in range(ROUNDS):
            with self._lock:
                done = here(self._state(tenant))
            if done:
                return RateDecision(True, ticket=int(done) if done is not True else 0)
            refused = acquire()
            if refused is not None:
                return refused
        return self._busy(tenant)

    def _busy(self, tenant: str) -> RateDecision:
        """Every grant this request waited for went to others first: the budget is being spent."""
        return RateDecision(False, f"tenant {tenant!r}: rate limits are being spent by other requests; retry", 1)

    # ---- grants (worker threads) -------------------------------------------------------------------
    def _acquire(self, tenant: str, rpm: int, tpm: int, tokens: int | None, max_concurrent: int
                 ) -> RateDecision | None:
        """Ask the ledger for a new lease and/or a slot, unless a grant made meanwhile already serves
        the request; None when there is something to take now, else the refusal."""
        if self._closed:  # nothing would give a new grant back
            raise LimitsUnavailable("tenant limits: the limiter is closed; request refused")
        with self._lock:
            st, turn = self._state(tenant), self._turns[tenant]
        with turn:
            with self._lock:
                if tokens is None:  # enter: a request left, and a slot
                    lease_ok = rpm == 0 or self._usable(st, 0, rpm, 0) is not None
                    slot = max_concurrent > 0 and st.in_flight >= min(st.slots, max_concurrent)
                else:
                    lease_ok = (rpm == 0 and tpm == 0) or self._usable(st, tokens, rpm, tpm) is not None
                    slot = False
                if lease_ok and not slot:
                    return None
                if not lease_ok and st.open is not None:
                    self._close(st)
                pending = self._pending(st)
                started = self._clock()
                collect = started - st.collected_at >= COLLECT_EVERY_S
                ask = GrantAsk(tenant, rpm, tpm if tokens is not None else st.tpm, max_concurrent,
                               lease=not lease_ok, need_tokens=tokens, slot=slot,
                               my_slots=max(st.slots, st.in_flight), writes=[w for _, w in pending],
                               lease_life_s=self._life, collect=collect)
            try:
                grant = self._ledger.grant(ask)
            except sa.exc.SQLAlchemyError as exc:
                raise LimitsUnavailable(f"tenant limits: the database could not be reached or refused the grant "
                                        f"({type(exc).__name__}); request refused") from exc
            with self._lock:
                for lease, write in pending:
                    lease.written = write
                if collect:
                    st.collected_at = started
                if grant.refused:
                    return RateDecision(False, grant.refused, grant.retry_after_s, grant.code)
                if grant.row:
                    st.open = _Lease(grant.row, grant.requests, grant.tokens, grant.granted_at, started,
                                     started + self._life,
                                     RowWrite(grant.row, grant.requests, grant.tokens,
                                              grant.granted_at + self._life + WINDOW_S))
                if slot:
                    # several slots at once: far from the limit, the surplus is kept a lease's life (no
                    # grant per request); one: near it, the surplus goes back at the next flush
                    if grant.slots - ask.my_slots > 1:
                        st.keep_slots_until = started + self._life
                    st.slots = st.slots_written = grant.slots
                    st.beat_at = started
        return None

    def _close(self, st: _Tenant) -> None:
        if st.open is not None:
            st.open.open = False
            st.closed.append(st.open)
            st.open = None

    def _pending(self, st: _Tenant) -> list[tuple[_Lease, RowWrite]]:
        """The closed leases whose row is not what they are now."""
        return [(lease, v) for lease in st.closed if (v := lease.values(self._life)) != lease.written]

    def _tidy(self, st: _Tenant, now: float) -> None:
        """Forget closed leases that are written and settled, or whose rows have expired anyway."""
        keep = []
        for lease in st.closed:
            expired = now > lease.started + self._life + WINDOW_S + 1
            if expired or (not lease.tickets and lease.written == lease.values(self._life)):
                for ticket in lease.tickets:  # a request longer than the window: settled into nothing
                    self._tickets.pop(ticket, None)
            else:
                keep.append(lease)
        st.closed = keep

    # ---- giving back (the flusher thread, and close) -------------------------------------------------
    def flush(self, *, final: bool = False) -> None:
        """Give back leases past their life (all with ``final``), write settlements and
        cancellations, return surplus slots (all with ``final``) and beat the heartbeat."""
        with self._lock:
            tenants = [(name, st, self._turns[name]) for name, st in self._tenants.items()]
        held: list[threading.Lock] = []
        marks: list[tuple[_Lease, RowWrite]] = []
        slots: dict[str, int] = {}
        now = self._clock()
        try:
            for name, st, turn in tenants:
                if not turn.acquire(blocking=final):
                    continue  # a grant is being made: it writes this tenant's changes itself
                held.append(turn)
                with self._lock:
                    if st.open is not None and (final or now >= st.open.usable_until):
                        self._close(st)
                    marks += self._pending(st)
                    target = 0 if final else st.in_flight if now >= st.keep_slots_until else st.slots
                    if st.slots > target:
                        st.slots = target  # here first: the ledger keeps the larger count until written
                    if st.slots != st.slots_written or (st.slots > 0 and now - st.beat_at >= self._beat_every):
                        slots[name] = st.slots
            self._ledger.write([w for _, w in marks], slots)
            with self._lock:
                for lease, write in marks:
                    lease.written = write
                for name, count in slots.items():
                    self._tenants[name].slots_written = count
                    self._tenants[name].beat_at = now
                for _name, st, turn in tenants:
                    if turn in held:
                        self._tidy(st, now)
        finally:
            for turn in held:
                turn.release()

    def _flush_forever(self, interval_s: float) -> None:
        failing = False
        while not self._stop.wait(interval_s):
            try:
                self.flush()
                failing = False
            except Exception as exc:  # the database is away: everything stays held (conservative) and is retried
                if not failing:
                    log.warning("tenant limits: giving back leases failed, retrying every %.2f s: %s: %s",
                                interval_s, type(exc).__name__, str(exc)[:300])
                failing = True

    def close(self) -> None:
        """Give back every lease and slot and stop the flusher (at gateway shutdown, after draining)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join(timeout=10)
        try:
            self.flush(final=True)
        except Exception as exc:  # what was held expires by itself: a window, or holder_expiry_s for slots
            log.warning("tenant limits: giving back leases at shutdown failed: %s: %s", type(exc).__name__,
                        str(exc)[:300])
        self._pool.shutdown(wait=False, cancel_futures=True)
