"""Token budgets per UTC day and UTC calendar month, kept in the database.

``reserve`` is called before generation with the most tokens the request can use (prompt +
max_tokens); ``settle`` after it with what was used. A reservation adds to both periods' counters
in one transaction of conditional updates (``tokens + n <= limit``), so threads and gateway
processes sharing the database cannot overspend by racing a read against a write; a refused
reservation changes nothing. The policy's ``max_tokens_per_day`` / ``max_tokens_per_month`` are
the limits (0 = no limit); usage is counted either way, for ``GET /v1/usage``.
"""

from __future__ import annotations

import datetime as dt
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
    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine
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
        """Replace the reservation by the tokens actually used, in the periods it was made in."""
        if reserved.tenant != tenant:
            raise ValueError(f"settle: expected the reservation of tenant {tenant!r}, found {reserved.tenant!r}")
        if isinstance(used, bool) or not isinstance(used, int) or used < 0:
            raise ValueError(f"tokens used: expected an int >= 0, found {used!r}")
        delta = used - reserved.tokens
        if delta == 0:
            return
        c = usage_table.c
        with self._engine.begin() as conn:
            conn.execute(usage_table.update()
                         .where(c.tenant == tenant, c.period.in_((reserved.day, reserved.month)))
                         .values(tokens=sa.case((c.tokens + delta < 0, 0), else_=c.tokens + delta)))

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
        with self._engine.connect() as conn:
            rows = {r.period: r for r in conn.execute(
                sa.select(usage_table).where(c.tenant == tenant, c.period.in_((day, month))))}
        return tuple(  # type: ignore[return-value]
            PeriodUsage(period[2:], int(rows[period].tokens) if period in rows else 0,
                        int(rows[period].requests) if period in rows else 0, limit, end.isoformat())
            for period, limit, end in ((day, policy.max_tokens_per_day, day_end),
                                       (month, policy.max_tokens_per_month, month_end)))

    def _tokens(self, tenant: str, period: str) -> int:
        with self._engine.connect() as conn:
            value = conn.execute(sa.select(usage_table.c.tokens).where(
                usage_table.c.tenant == tenant, usage_table.c.period == period)).scalar()
        return int(value or 0)
