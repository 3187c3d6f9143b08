"""Token budgets per UTC day and UTC calendar month, kept in the database.

``reserve`` is called before generation with the most tokens the request can use (prompt +
max_tokens); ``settle`` after it with what was used. A reservation adds to both periods' counters
in one transaction of conditional updates (``tokens + n <= limit``), so threads and gateway
processes sharing the database cannot overspend by racing a read against a write; a refused
reservation changes nothing. The policy's ``max_tokens_per_day`` / ``max_tokens_per_month`` are
the limits (0 = no limit); usage is counted either way, for ``GET /v1/usage``.

What needs no check is counted later, in batches: ``count`` (the tokens of a request without a
budget) and ``settle`` (what a finished request gives back of its reservation) add to an in-memory
delta that a flusher thread writes in one transaction every ``flush_interval_s`` and at ``close``.
That takes a write transaction (an fsync on SQLite) off every request. Giving budget back late
never lets a tenant overspend; ``usage`` adds this process's pending deltas, so a tenant reading
its usage from the gateway that served it sees its last request. If the process is killed, at most
one interval of counts is lost from these counters; every request's tokens stay in its audit record.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

metadata = sa.MetaData()

usage_table = sa.Table(
    "token_usage",
    metadata,
    sa.Column("tenant", sa.String(64), primary_key=True),
    sa.Column("period", sa.String(16), primary_key=True),  # "d:2026-12-07" or "m:2026-12"
    sa.Column("tokens", sa.BigInteger, nullable=False, default=0),
    sa.Column("requests", sa.BigInteger, nullable=False, default=0),
)


class BudgetLimits(Protocol):
    """What a budget check reads of a tenant's policy (``policies.TenantPolicy`` has it)."""

    @property
    def max_tokens_per_day(self) -> int: ...

    @property
    def max_tokens_per_month(self) -> int: ...


@dataclass(frozen=True)
class Reservation:
    tenant: str
    tokens: int
    day: str
    month: str


@dataclass(frozen=True)
class BudgetDecision:
    allowed: bool
    reservation: Reservation | None
    code: str = ""  # "token_budget_exceeded" when refused
    reason: str = ""
    retry_after_s: int | None = None


@dataclass(frozen=True)
class PeriodUsage:
    period: str
    tokens: int
    requests: int
    limit: int  # 0 = no limit
    resets_at: str

    def to_dict(self) -> dict[str, Any]:
        remaining = None if self.limit == 0 else max(self.limit - self.tokens, 0)
        return {"period": self.period, "tokens": self.tokens, "requests": self.requests,
                "limit": self.limit or None, "remaining": remaining, "resets_at": self.resets_at}


class _Refused(Exception):
    def __init__(self, period: str, limit: int, end: dt.datetime, name: str) -> None:
        super().__init__(period)
        self.period, self.limit, self.end, self.name = period, limit, end, name


def _periods(now: dt.datetime) -> tuple[str, str, dt.datetime, dt.datetime]:
    now = now.astimezone(dt.UTC)
    day_end = dt.datetime(now.year, now.month, now.day, tzinfo=dt.UTC) + dt.timedelta(days=1)
    month_end = dt.datetime(now.year + (now.month == 12), now.month % 12 + 1, 1, tzinfo=dt.UTC)
    return f"d:{now:%Y-%m-%d}", f"m:{now:%Y-%m}", day_end, month_end


class UsageStore:
    def __init__(self, engine: sa.Engine, *, flush_interval_s: float = 0.2) -> None:
        self._engine = engine
        self._flush_interval_s = flush_interval_s
        # (tenant, period) -> [tokens, requests] not yet written; guarded by _pending_lock
        self._pending: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        self._pending_lock = threading.Lock()
        self._flush_lock = threading.Lock()  # one flush at a time (the thread's, close's)
        self._wake = threading.Event()
        self._stopping = False
        self._flusher: threading.Thread | None = None
        metadata.create_all(engine)
        inserts: dict[str, Any] = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}
        if engine.dialect.name not in inserts:
            raise ValueError(f"usage store: expected a sqlite or postgresql database, found {engine.dialect.name}")
        self._insert = inserts[engine.dialect.name]

    def reserve(self, tenant: str, tokens: int, policy: BudgetLimits, *, now: dt.datetime | None = None
                ) -> BudgetDecision:
        """Reserve ``tokens`` for one request against today's and this month's budgets."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"tokens to reserve: expected an int >= 0, found {tokens!r}")
        now = now or dt.datetime.now(dt.UTC)
        day, month, day_end, month_end = _periods(now)
        c = usage_table.c
        try:
            with self._engine.begin() as conn:
                for period in (day, month):
                    conn.execute(self._insert(usage_table).values(tenant=tenant, period=period, tokens=0, requests=0)
                                 .on_conflict_do_nothing())
                for period, limit, end, name in ((day, policy.max_tokens_per_day, day_end, "day"),
                                                 (month, policy.max_tokens_per_month, month_end, "month")):
                    stmt = (usage_table.update().where(c.tenant == tenant, c.period == period)
                            .values(tokens=c.tokens + tokens, requests=c.requests + 1))
                    if limit > 0:
                        stmt = stmt.where(c.tokens + tokens <= limit)
                    if conn.execute(stmt).rowcount != 1:
                        raise _Refused(period, limit, end, name)  # rolls the whole reservation back
        except _Refused as refused:
            used = self._tokens(tenant, refused.period)
            return BudgetDecision(
                False, None, "token_budget_exceeded",
                f"token budget per UTC {refused.name} of tenant {tenant!r}: expected at most {refused.limit} tokens, "
                f"found {used} used and {tokens} more requested (resets at {refused.end.isoformat()})",
                max(1, int((refused.end - now).total_seconds()) + 1))
        return BudgetDecision(True, Reservation(tenant, tokens, day, month))

    def settle(self, tenant: str, reserved: Reservation, used: int) -> None:
        """Replace the reservation by the tokens actually used, in the periods it was made in (written
        with the next batch; see the module's doc)."""
        if reserved.tenant != tenant:
            raise ValueError(f"settle: expected the reservation of tenant {tenant!r}, found {reserved.tenant!r}")
        if isinstance(used, bool) or not isinstance(used, int) or used < 0:
            raise ValueError(f"tokens used: expected an int >= 0, found {used!r}")
        delta = used - reserved.tokens
        if delta != 0:
            self._add(tenant, (reserved.day, reserved.month), delta, 0)

    def count(self, tenant: str, tokens: int, *, now: dt.datetime | None = None) -> None:
        """Count one finished request of a tenant without a budget (written with the next batch)."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"tokens to count: expected an int >= 0, found {tokens!r}")
        day, month, _, _ = _periods(now or dt.datetime.now(dt.UTC))
        self._add(tenant, (day, month), tokens, 1)

    def _add(self, tenant: str, periods: tuple[str, str], tokens: int, requests: int) -> None:
        with self._pending_lock:
            for period in periods:
                entry = self._pending[(tenant, period)]
                entry[0] += tokens
                entry[1] += requests
            if self._flusher is None and not self._stopping:
                self._flusher = threading.Thread(target=self._run_flusher, name="usage-flush", daemon=True)
                self._flusher.start()

    def _run_flusher(self) -> None:
        while not self._stopping:
            self._wake.wait(self._flush_interval_s)
            try:
                self.flush()
            except sa.exc.SQLAlchemyError:  # the database is away: the deltas stay pending, retried
                pass

    def flush(self) -> None:
        """Write the pending deltas in one transaction (kept pending if it fails)."""
        with self._flush_lock:
            with self._pending_lock:
                batch, self._pending = self._pending, defaultdict(lambda: [0, 0])
            if not batch:
                return
            c = usage_table.c
            try:
                with self._engine.begin() as conn:
                    for (tenant, period), (tokens, requests) in sorted(batch.items()):
                        conn.execute(self._insert(usage_table).values(tenant=tenant, period=period, tokens=0,
                                                                      requests=0).on_conflict_do_nothing())
                        conn.execute(usage_table.update().where(c.tenant == tenant, c.period == period).values(
                            tokens=sa.case((c.tokens + tokens < 0, 0), else_=c.tokens + tokens),
                            requests=c.requests + requests))
            except BaseException:
                with self._pending_lock:  # back into the pending deltas, with what came meanwhile
                    for key, (tokens, requests) in batch.items():
                        entry = self._pending[key]
                        entry[0] += tokens
                        entry[1] += requests
                raise

    def close(self) -> None:
        """Stop the flusher and write what is pending."""
        self._stopping = True
        self._wake.set()
        thread, self._flusher = self._flusher, None
        if thread is not None:
            thread.join(timeout=10)
        self.flush()
        self._stopping = False
        self._wake.clear()

    def _pending_for(self, tenant: str, period: str) -> tuple[int, int]:
        with self._pending_lock:
            entry = self._pending.get((tenant, period))
            return (entry[0], entry[1]) if entry else (0, 0)

    def release(self, tenant: str, reserved: Reservation) -> None:
        """Undo a reservation whose request was refused after it was made (admission, audit): the
        tokens and the request are taken back, as if it had never been reserved."""
        if reserved.tenant != tenant:
            raise ValueError(f"release: expected the reservation of tenant {tenant!r}, found {reserved.tenant!r}")
        c = usage_table.c
        with self._engine.begin() as conn:
            conn.execute(usage_table.update()
                         .where(c.tenant == tenant, c.period.in_((reserved.day, reserved.month)))
                         .values(tokens=sa.case((c.tokens - reserved.tokens < 0, 0), else_=c.tokens - reserved.tokens),
                                 requests=sa.case((c.requests < 1, 0), else_=c.requests - 1)))

    def usage(self, tenant: str, policy: BudgetLimits, *, now: dt.datetime | None = None
              ) -> tuple[PeriodUsage, PeriodUsage]:
        """Today's and this month's usage of ``tenant``."""
        day, month, day_end, month_end = _periods(now or dt.datetime.now(dt.UTC))
        c = usage_table.c
        # under the flush lock: a batch taken out of the pending deltas is either not yet in the
        # table (then still in neither: wait for its commit) or committed, never counted twice or lost
        with self._flush_lock:
            with self._engine.connect() as conn:
                rows = {r.period: r for r in conn.execute(
                    sa.select(usage_table).where(c.tenant == tenant, c.period.in_((day, month))))}
            pending = {period: self._pending_for(tenant, period) for period in (day, month)}
        result = []
        for period, limit, end in ((day, policy.max_tokens_per_day, day_end),
                                   (month, policy.max_tokens_per_month, month_end)):
            tokens, requests = pending[period]
            if period in rows:
                tokens, requests = tokens + int(rows[period].tokens), requests + int(rows[period].requests)
            result.append(PeriodUsage(period[2:], max(tokens, 0), requests, limit, end.isoformat()))
        return result[0], result[1]

    def _tokens(self, tenant: str, period: str) -> int:
        with self._flush_lock:  # as in usage(): the table and the pending deltas read as one
            with self._engine.connect() as conn:
                value = conn.execute(sa.select(usage_table.c.tokens).where(
                    usage_table.c.tenant == tenant, usage_table.c.period == period)).scalar()
            return max(int(value or 0) + self._pending_for(tenant, period)[0], 0)
