"""Retention: prune the bodies of tenant records older than the policy keeps, leaving the log verifiable.

A pruned record keeps seq, ts, event_type, actor, tenant, request_id, prev_hash and hash; its
``data`` becomes ``{}`` and ``pruned_at`` is set. Its hash, chain link and tree leaves are
unchanged, so ``AuditLog.verify()``, every checkpoint and every proof still hold (verification
skips the hash recomputation of a pruned record only). ``_admin`` is never pruned, nor a record
under an active legal hold (``holds.py``).

One run (``Pruner.run_once``), per tenant stream, in this order:

1. plan: the seq range of records with ``ts < now - audit_days`` not yet pruned and not held,
   at most ``max_records`` of them per run;
2. intent: a row in ``audit_prune_runs`` and then the signed record ``admin.audit_prune_started``
   on ``_admin`` (run id, tenant, seq range, planned count, cutoff, policy digest);
3. prune: ``UPDATE`` in batches of ``batch_size`` seqs, one short write transaction per batch,
   each re-checking the cutoff and the holds in its own statement (a hold added meanwhile is
   honoured); the run stops early after ``max_seconds``;
4. done: the signed record ``admin.audit_pruned`` (run id, tenant, seq range, count actually
   pruned, cutoff, policy digest, ``pruned_at``), then the run row is closed.

A crash between 2 and 4 leaves an ``admin.audit_prune_started`` with no ``admin.audit_pruned``
(visible to anyone reading ``_admin``) and an open run row. A run row open for less than
``stale_after_s`` (10 minutes; a run is bounded by ``max_seconds``) may be another pruner's at
work (a CLI run beside the appliance's own): the run does nothing and its report says so. An
older one is closed with an ``admin.audit_pruned`` carrying ``"recovered": true`` and the count of
records that run did prune (they carry its ``pruned_at``); then the run plans afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import BigInteger, Column, Connection, Engine, String, Table, and_, func, not_, select, update
from sqlalchemy.exc import SQLAlchemyError

from appliance.audit.canonical import format_ts, utc_now_ts
from appliance.audit.errors import AuditError
from appliance.audit.holds import HoldStore, held_clause
from appliance.audit.log import AuditLog
from appliance.audit.prune_check import unaccounted_prunes as check_prunes
from appliance.audit.record import ADMIN_STREAM
from appliance.audit.schema import WRITE_OPTION, audit_events, metadata
from policies import PolicySet

log = logging.getLogger("appliance.audit.retention")

SYSTEM_ACTOR = "appliance:retention"

# One row per prune run and tenant: the work list that lets a run interrupted by a crash be closed.
audit_prune_runs = Table(
    "audit_prune_runs",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("tenant", String(128), nullable=False),
    Column("first_seq", BigInteger, nullable=False),
    Column("last_seq", BigInteger, nullable=False),
    Column("cutoff", String(32), nullable=False),
    Column("policy_digest", String(80), nullable=False),
    Column("pruned_at", String(32), nullable=False),  # stamped on every record this run prunes
    Column("actor", String(256), nullable=False),
    Column("started_at", String(32), nullable=False),  # wall clock, for telling a live run from a dead one
    Column("finished_at", String(32), nullable=True),
)


@dataclass(frozen=True)
class TenantPrune:
    """What one run did (or, dry, would do) to one tenant stream."""

    tenant: str
    audit_days: int
    cutoff: str
    count: int
    first_seq: int | None
    last_seq: int | None
    held: int = 0  # records past the cutoff kept by legal holds
    run_id: str | None = None
    complete: bool = True  # False: stopped by max_records or max_seconds; the next run goes on


@dataclass(frozen=True)
class PruneReport:
    dry_run: bool
    now: str
    policy_digest: str
    tenants: list[TenantPrune] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)  # run ids closed after an interruption
    skipped: str | None = None  # why nothing was done: another pruner is at work

    @property
    def pruned(self) -> int:
        return sum(t.count for t in self.tenants)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "pruned": self.pruned}


class Pruner:
    """Prunes per the retention policy. ``policies``: the set in force, or a callable giving it
    (re-read at every run). ``now``: the clock (tests move it forward instead of waiting days)."""

    def __init__(
        self, log: AuditLog, policies: PolicySet | Callable[[], PolicySet], *, holds: HoldStore | None = None,
        batch_size: int = 1000, max_records: int = 100_000, max_seconds: float = 30.0,
        actor: str = SYSTEM_ACTOR, now: Callable[[], datetime] | None = None, stale_after_s: float = 600.0,
    ) -> None:
        if batch_size < 1 or max_records < 1 or max_seconds <= 0 or stale_after_s <= 0:
            raise ValueError(f"batch_size >= 1, max_records >= 1, max_seconds > 0, stale_after_s > 0 expected, "
                             f"found {batch_size}, {max_records}, {max_seconds}, {stale_after_s}")
        self.stale_after_s = stale_after_s
        self.log = log
        self.engine = log.engine
        self._policies = policies
        self.holds = holds or HoldStore(log)
        self.batch_size = batch_size
        self.max_records = max_records
        self.max_seconds = max_seconds
        self.actor = actor
        self._now = now or (lambda: datetime.now(UTC))
        self._stopping = threading.Event()
        self._wake: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        audit_prune_runs.create(self.engine, checkfirst=True)

    def stop(self) -> None:
        """End ``run_every``: a run in progress stops after its current batch (still writing its
        done record), a sleeping loop wakes and returns. Safe from any thread."""
        self._stopping.set()
        if self._wake is not None:
            loop, wake = self._wake
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(wake.set)

    async def run_every(self, interval_s: float) -> None:
        """The periodic task: ``run_once`` in a worker thread (never on the event loop), then
        ``interval_s`` of sleep; a failed run is logged and retried at the next interval.
        Returns after ``stop()``, once the run in progress has finished its batch."""
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, found {interval_s}")
        wake = asyncio.Event()
        self._wake = (asyncio.get_running_loop(), wake)
        while not self._stopping.is_set():
            try:
                report = await asyncio.to_thread(self.run_once)
                if report.pruned or report.recovered:
                    log.info("audit retention: pruned %d records, closed %d interrupted runs",
                             report.pruned, len(report.recovered))
            except Exception:
                log.exception("audit retention run failed; next try in %.0f s", interval_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), interval_s)

    def policies(self) -> PolicySet:
        return self._policies() if callable(self._policies) else self._policies

    def run_once(self, *, dry_run: bool = False) -> PruneReport:
        """Prune every tenant stream once (bounded by ``max_records`` and ``max_seconds``)."""
        policies = self.policies()
        now = self._now()
        report = PruneReport(dry_run, format_ts(now), policies.digest)
        try:
            if not dry_run:
                busy = self._recover(report.recovered)
                if busy is not None:
                    return dataclasses.replace(report, skipped=busy)
            deadline = time.monotonic() + self.max_seconds
            budget = self.max_records
            for tenant in self._tenant_streams():
                days = policies.retention.audit_days_for(tenant)
                cutoff = format_ts(now - timedelta(days=days))
                result = self._prune_tenant(tenant, days, cutoff, policies.digest, dry_run=dry_run,
                                            budget=budget, deadline=deadline)
                budget -= result.count
                report.tenants.append(result)
                if budget <= 0 or time.monotonic() >= deadline or self._stopping.is_set():
                    break
        except SQLAlchemyError as exc:
            raise AuditError(f"audit retention could not read or update the database: {type(exc).__name__}") from exc
        return report

    # -- one tenant -------------------------------------------------------------------------

    def _tenant_streams(self) -> list[str]:
        ev = audit_events.c
        with self.engine.connect() as conn:
            names = conn.execute(select(ev.stream).distinct().where(ev.stream != ADMIN_STREAM)).scalars().all()
        return sorted(names)

    def _prune_tenant(self, tenant: str, days: int, cutoff: str, digest: str, *, dry_run: bool, budget: int,
                      deadline: float) -> TenantPrune:
        ev = audit_events.c
        due = and_(ev.stream == tenant, ev.pruned_at.is_(None), ev.ts < cutoff)
        with self.engine.connect() as conn:
            held = conn.execute(select(func.count()).where(due, held_clause(tenant))).scalar() or 0
            eligible = and_(due, not_(held_clause(tenant)))
            first = conn.execute(select(func.min(ev.seq)).where(eligible)).scalar()
            if first is None:
                return TenantPrune(tenant, days, cutoff, 0, None, None, held)
            total = conn.execute(select(func.count()).where(eligible)).scalar() or 0
            last = conn.execute(select(ev.seq).where(eligible).order_by(ev.seq)
                                .offset(min(budget, total) - 1).limit(1)).scalar()
        assert last is not None
        planned = min(budget, total)
        if dry_run:
            return TenantPrune(tenant, days, cutoff, planned, int(first), int(last), held,
                               complete=planned == total)
        run_id = "prune-" + uuid.uuid4().hex[:12]
        pruned_at = format_ts(self._now())
        facts = {"run_id": run_id, "first_seq": int(first), "last_seq": int(last), "cutoff": cutoff,
                 "audit_days": days, "policy_digest": digest, "pruned_at": pruned_at}
        with self.engine.begin() as conn:
            conn.execute(audit_prune_runs.insert().values(
                id=run_id, tenant=tenant, first_seq=first, last_seq=last, cutoff=cutoff, policy_digest=digest,
                pruned_at=pruned_at, actor=self.actor, started_at=utc_now_ts()))
        self.log.append("admin.audit_prune_started", stream=ADMIN_STREAM, actor=self.actor, tenant=tenant,
                        data={**facts, "count": planned})
        count, end = 0, int(first) - 1
        while end < int(last) and time.monotonic() < deadline and not self._stopping.is_set():
            start, end = end + 1, min(end + self.batch_size, int(last))
            count += self._prune_batch(tenant, start, end, cutoff, pruned_at)
        done = {**facts, "last_seq": end, "count": count}
        self._finish(run_id, tenant, done)
        return TenantPrune(tenant, days, cutoff, count, int(first), end, held, run_id,
                           complete=end == int(last) and planned == total)

    def _prune_batch(self, tenant: str, start: int, end: int, cutoff: str, pruned_at: str) -> int:
        ev = audit_events.c
        stmt = (update(audit_events)
                .where(ev.stream == tenant, ev.seq >= start, ev.seq <= end, ev.pruned_at.is_(None), ev.ts < cutoff,
                       not_(held_clause(tenant)))
                .values(data="{}", pruned_at=pruned_at))
        with self.engine.connect() as conn:
            conn.execution_options(**{WRITE_OPTION: True})  # SQLite: BEGIN IMMEDIATE, as the writer does
            with conn.begin():
                return int(conn.execute(stmt).rowcount or 0)

    def _finish(self, run_id: str, tenant: str, data: dict[str, Any]) -> None:
        self.log.append("admin.audit_pruned", stream=ADMIN_STREAM, actor=self.actor, tenant=tenant, data=data)
        with self.engine.begin() as conn:
            conn.execute(update(audit_prune_runs).where(audit_prune_runs.c.id == run_id)
                         .values(finished_at=format_ts(self._now())))

    # -- interrupted runs ---------------------------------------------------------------------

    def _recover(self, closed: list[str]) -> str | None:
        """Close the runs a crash left open (appending their ids to ``closed``); a run started
        less than ``stale_after_s`` ago may be another pruner's, at work: then say so and do nothing."""
        r = audit_prune_runs.c
        with self.engine.connect() as conn:
            open_runs = conn.execute(
                select(audit_prune_runs).where(r.finished_at.is_(None)).order_by(r.started_at)).all()
            live_since = format_ts(datetime.now(UTC) - timedelta(seconds=self.stale_after_s))
            live = [row for row in open_runs if row.started_at >= live_since]
            if live:
                return (f"another prune run is in progress ({live[0].id} of tenant {live[0].tenant}, started "
                        f"{live[0].started_at}); a run left open longer than {self.stale_after_s:.0f} s is closed")
            counts = [_pruned_by(conn, row) for row in open_runs]
        for row, (count, last) in zip(open_runs, counts, strict=True):
            log.warning("audit retention: closing prune run %s of tenant %s, interrupted after %d records",
                        row.id, row.tenant, count)
            self._finish(row.id, row.tenant, {
                "run_id": row.id, "first_seq": row.first_seq, "last_seq": last if last is not None else row.first_seq,
                "cutoff": row.cutoff, "policy_digest": row.policy_digest, "count": count,
                "pruned_at": row.pruned_at, "recovered": True})
            closed.append(row.id)
        return None

def _pruned_by(conn: Connection, run: Any) -> tuple[int, int | None]:
    """How many records of ``run``'s range carry its ``pruned_at``, and the last of their seqs."""
    ev = audit_events.c
    row = conn.execute(select(func.count(), func.max(ev.seq)).where(
        ev.stream == run.tenant, ev.seq >= run.first_seq, ev.seq <= run.last_seq, ev.pruned_at == run.pruned_at)).one()
    return int(row[0] or 0), None if row[1] is None else int(row[1])



def unaccounted_prunes(engine: Engine, *, limit: int = 10) -> list[str]:
    """Pruned records that no signed ``admin.audit_prune_started`` accounts for (see
    ``prune_check``), described one per line."""
    with engine.connect() as conn:
        return [f.describe() if f.stream is None else f"{f.stream} {f.describe()}"
                for f in check_prunes(conn, limit=limit)]
