"""The database side of the tenant limits every gateway shares: a ledger of leases and slot holders.

A gateway process (a *holder*) never asks the database per request. It asks for a *lease*: a slice
of a tenant's requests-per-minute and tokens-per-minute budgets, granted in one transaction that
locks the tenant (``SELECT ... FOR UPDATE`` of its row in ``rate_limit_tenants`` on PostgreSQL; on
SQLite ``BEGIN IMMEDIATE`` takes the database's write lock), adds up what the window already holds
and inserts the lease as a row of ``rate_limit_leases`` only if it fits. A lease row counts in full
while its holder may still use it; when it is given back the row shrinks to what was used and
expires one window after its last use (appliance/limit_leases.py computes those values). Rows of
leases that a dead holder never gave back expire on their own: the budget they held is lost for at
most one window plus the lease's life.

Concurrency slots live in ``rate_limit_holders`` (tenant, holder, slots, heartbeat): a grant
checks the live holders' slots against ``max_concurrent``; a holder whose heartbeat is older than
``holder_expiry_s`` is dead and its slots no longer count (and are deleted).

Times are seconds since the epoch on one clock for all holders: the database's on PostgreSQL
(gateways on several hosts), the local wall clock on SQLite (one host), or a clock given for tests.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

COLLECT_AFTER_S = 30.0  # expired lease rows are deleted this long after they stopped counting

metadata = sa.MetaData()

tenants_table = sa.Table(  # one row per tenant: what a grant locks on PostgreSQL
    "rate_limit_tenants", metadata,
    sa.Column("tenant", sa.String(64), primary_key=True),
)

leases_table = sa.Table(
    "rate_limit_leases", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("holder", sa.String(128), nullable=False),
    sa.Column("requests", sa.BigInteger, nullable=False),
    sa.Column("tokens", sa.BigInteger, nullable=False),
    sa.Column("expires_at", sa.Double, nullable=False),  # the row counts in the window until then
    sa.Column("returned_by", sa.Double, nullable=False),  # its holder gives back what is unused by then
    sa.Index("ix_rate_limit_leases_tenant_expires", "tenant", "expires_at"),
)

holders_table = sa.Table(
    "rate_limit_holders", metadata,
    sa.Column("tenant", sa.String(64), primary_key=True),
    sa.Column("holder", sa.String(128), primary_key=True),
    sa.Column("slots", sa.Integer, nullable=False),
    sa.Column("heartbeat", sa.Double, nullable=False),
)


@dataclass(frozen=True)
class RowWrite:
    """New values of one lease row, once its holder gave it back; ``requests == tokens == 0``: the
    row is deleted."""

    row: int
    requests: int
    tokens: int
    expires_at: float


@dataclass(frozen=True)
class GrantAsk:
    """What one holder asks of one tenant's budgets. ``lease`` asks for a new lease (at least one
    request where ``rpm`` > 0 and ``need_tokens`` tokens where ``tpm`` > 0; ``need_tokens`` None:
    ``enter`` asks, which checks requests only and takes whatever tokens fit); ``slot`` asks for one
    concurrency slot more than ``my_slots``. ``writes`` are the holder's pending row changes, written
    first so that what it gave back counts."""

    tenant: str
    rpm: int
    tpm: int
    max_concurrent: int
    lease: bool
    need_tokens: int | None
    slot: bool
    my_slots: int
    writes: Sequence[RowWrite]
    lease_life_s: float  # how long after the grant the holder may still use it
    collect: bool = False  # also delete this tenant's expired rows and dead holders


@dataclass(frozen=True)
class Grant:
    refused: str = ""  # the reason, RateDecision's wording; "" when granted
    code: str = ""
    retry_after_s: int = 0
    row: int = 0  # the new lease's row (0: no lease asked)
    requests: int = 0
    tokens: int = 0
    granted_at: float = 0.0  # the ledger's clock at the grant
    slots: int = 0  # the holder's slots now (when a slot was asked)


def share(remaining: int, need: int, holders: int) -> int:
    """A lease's size: what is needed, or more while far from the limit, namely this holder's half
    share of what remains (``remaining // (2 * holders)``), so that the active holders together never
    take more than half the remainder at once and, near the limit, each gets exactly what one
    request needs. ``remaining >= need`` (checked by the caller)."""
    return max(need, min(remaining, remaining // (2 * max(1, holders))))


class LeaseLedger:
    def __init__(self, engine: sa.Engine, holder: str, *, window_s: float, holder_expiry_s: float,
                 clock: Callable[[], float] | None = None) -> None:
        if engine.dialect.name not in ("sqlite", "postgresql"):
            raise ValueError(f"tenant limits: expected a sqlite or postgresql database, found {engine.dialect.name}")
        self.engine, self.holder, self.window_s, self.holder_expiry_s = engine, holder, window_s, holder_expiry_s
        self._pg = engine.dialect.name == "postgresql"
        self._clock = clock
        metadata.create_all(engine)
        self._migrate()

    def _migrate(self) -> None:
        """Tables made by the first version lack ``returned_by`` (0: nothing outstanding)."""
        columns = {c["name"] for c in sa.inspect(self.engine).get_columns("rate_limit_leases")}
        if "returned_by" in columns:
            return
        add = ("ADD COLUMN IF NOT EXISTS returned_by DOUBLE PRECISION" if self._pg else "ADD COLUMN returned_by REAL")
        try:
            with self.engine.begin() as conn:
                conn.exec_driver_sql(f"ALTER TABLE rate_limit_leases {add} NOT NULL DEFAULT 0")
        except sa.exc.OperationalError as exc:  # SQLite: another gateway starting at once added it first
            if "duplicate column" not in str(exc.orig):
                raise

    # ---- transactions ------------------------------------------------------------------------
    @contextmanager
    def _transaction(self) -> Iterator[sa.Connection]:
        with self.engine.connect() as conn:
            if not self._pg:  # pysqlite would begin lazily and deferred: take the write lock now
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.rollback()
                raise
            conn.commit()

    def _now(self, conn: sa.Connection) -> float:
        if self._clock is not None:
            return self._clock()
        if self._pg:
            return float(conn.exec_driver_sql("SELECT extract(epoch FROM clock_timestamp())::float8").scalar_one())
        return time.time()

    def _lock_tenant(self, conn: sa.Connection, tenant: str) -> None:
        if not self._pg:
            return  # BEGIN IMMEDIATE holds the whole database
        lock = sa.select(tenants_table.c.tenant).where(tenants_table.c.tenant == tenant).with_for_update()
        if conn.execute(lock).first() is None:  # the tenant's first grant ever
            conn.execute(postgresql.insert(tenants_table).values(tenant=tenant).on_conflict_do_nothing())
            conn.execute(lock).one()

    def _write_rows(self, conn: sa.Connection, writes: Sequence[RowWrite]) -> None:
        c = leases_table.c
        gone = [w.row for w in writes if w.requests == 0 and w.tokens == 0]
        kept = [w for w in writes if w.requests != 0 or w.tokens != 0]
        if gone:
            conn.execute(leases_table.delete().where(c.id.in_(gone)))
        if kept:
            conn.execute(leases_table.update().where(c.id == sa.bindparam("row_id")).values(
                requests=sa.bindparam("n_requests"), tokens=sa.bindparam("n_tokens"),
                expires_at=sa.bindparam("n_expires"), returned_by=0.0),  # written once given back
                [{"row_id": w.row, "n_requests": w.requests, "n_tokens": w.tokens, "n_expires": w.expires_at}
                 for w in kept])

    def _set_slots(self, conn: sa.Connection, tenant: str, slots: int, now: float) -> None:
        c = holders_table.c
        if slots <= 0:
            conn.execute(holders_table.delete().where(c.tenant == tenant, c.holder == self.holder))
            return
        insert = (postgresql.insert if self._pg else sqlite.insert)(holders_table).values(
            tenant=tenant, holder=self.holder, slots=slots, heartbeat=now)
        conn.execute(insert.on_conflict_do_update(index_elements=[c.tenant, c.holder],
                                                  set_={"slots": slots, "heartbeat": now}))

    # ---- the grant ------------------------------------------------------------------------------
    def grant(self, ask: GrantAsk) -> Grant:
        """Write ``ask.writes``, then grant the lease and/or slot asked for, or refuse (nothing granted)."""
        c, h = leases_table.c, holders_table.c
        with self._transaction() as conn:
            self._lock_tenant(conn, ask.tenant)
            now = self._now(conn)
            self._write_rows(conn, ask.writes)
            if ask.collect:  # rows expired a while ago: their holders write them no more (no lock waits)
                conn.execute(leases_table.delete().where(c.tenant == ask.tenant, c.expires_at <= now - COLLECT_AFTER_S))
                conn.execute(holders_table.delete().where(
                    h.tenant == ask.tenant, h.holder != self.holder, h.heartbeat <= now - self.holder_expiry_s))
            requests = tokens = 0
            if ask.lease:
                window = conn.execute(sa.select(
                    sa.func.coalesce(sa.func.sum(c.requests), 0), sa.func.coalesce(sa.func.sum(c.tokens), 0),
                    sa.func.min(sa.case((c.requests > 0, c.expires_at))),
                    sa.func.min(sa.case((c.tokens > 0, c.expires_at))),
                    sa.func.count(sa.distinct(c.holder)),
                    sa.func.max(sa.case((c.holder == self.holder, 1), else_=0)),
                    sa.func.min(sa.case((sa.and_(c.holder != self.holder, c.returned_by > now), c.returned_by))),
                ).where(c.tenant == ask.tenant, c.expires_at > now)).one()
                used_requests, used_tokens = int(window[0]), int(window[1])
                holders = int(window[4]) + (0 if window[5] else 1)
                if ask.rpm > 0 and used_requests + 1 > ask.rpm:
                    return Grant(f"rate limit of {ask.rpm} requests per minute reached",
                                 "rate_limit_exceeded", self._wait(window[2], window[6], now))
                need = ask.need_tokens or 0
                if ask.need_tokens is not None and ask.tpm > 0 and used_tokens + need > ask.tpm:
                    return Grant(f"token limit of {ask.tpm} tokens per minute reached ({used_tokens} used, "
                                 f"{need} requested)", "rate_limit_exceeded", self._wait(window[3], window[6], now))
                requests = share(ask.rpm - used_requests, 1, holders) if ask.rpm > 0 else 0
                left = ask.tpm - used_tokens
                tokens = share(left, need, holders) if ask.tpm > 0 and left >= need else 0
            slots = ask.my_slots
            if ask.slot:
                others, holding = conn.execute(sa.select(
                    sa.func.coalesce(sa.func.sum(h.slots), 0), sa.func.count()).where(
                    h.tenant == ask.tenant, h.holder != self.holder, h.slots > 0,
                    h.heartbeat > now - self.holder_expiry_s)).one()
                free = ask.max_concurrent - int(others) - ask.my_slots
                if free < 1:
                    return Grant(f"concurrency limit of {ask.max_concurrent} requests in flight reached",
                                 "concurrency_limit_exceeded", 1)
                slots = ask.my_slots + share(free, 1, int(holding) + 1)
                self._set_slots(conn, ask.tenant, slots, now)
            row = 0
            if ask.lease:
                row = int(conn.execute(leases_table.insert().values(
                    tenant=ask.tenant, holder=self.holder, requests=requests, tokens=tokens,
                    expires_at=now + ask.lease_life_s + self.window_s, returned_by=now + ask.lease_life_s,
                ).returning(leases_table.c.id)).scalar_one())
            return Grant(row=row, requests=requests, tokens=tokens, granted_at=now, slots=slots)

    def _wait(self, oldest_expiry: float | None, first_return: float | None, now: float) -> int:
        """Retry-After: until the oldest counted row expires, as the in-memory limiter says, or,
        sooner, until another holder's lease gives back what it did not use (its grant was checked
        against the same window, so part of it may be free again then)."""
        wait = (oldest_expiry if oldest_expiry is not None else now + self.window_s) - now
        if first_return is not None:
            wait = min(wait, first_return - now + 1)
        return max(1, math.ceil(wait))

    def write(self, writes: Sequence[RowWrite], slots: dict[str, int]) -> None:
        """Give back and settle (``writes``), and set this holder's slots per tenant (a heartbeat)."""
        if not writes and not slots:
            return
        with self._transaction() as conn:
            now = self._now(conn)
            self._write_rows(conn, writes)
            for tenant, count in slots.items():
                self._set_slots(conn, tenant, count, now)

    # ---- for operators and tests ------------------------------------------------------------------
    def totals(self, tenant: str) -> tuple[int, int, int]:
        """(requests, tokens) counted in the tenant's window now, and the live holders' slots."""
        c, h = leases_table.c, holders_table.c
        with self.engine.connect() as conn:
            now = self._now(conn)
            requests, tokens = conn.execute(sa.select(
                sa.func.coalesce(sa.func.sum(c.requests), 0), sa.func.coalesce(sa.func.sum(c.tokens), 0)).where(
                c.tenant == tenant, c.expires_at > now)).one()
            slots = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(h.slots), 0)).where(
                h.tenant == tenant, h.heartbeat > now - self.holder_expiry_s)).scalar_one()
        return int(requests), int(tokens), int(slots)
