"""Legal holds: a tenant, or a tenant and period, whose audit records retention must not prune.

A hold covers the tenant's records with ``since <= ts < until`` (either bound open when
``None``; both open: every record of the tenant). Holds live in ``audit_legal_holds``, in the
audit database, defined on the audit schema's ``metadata`` (so ``make_engine`` creates the
table once this module is imported) and created here when absent.

Every change is an audit event on ``_admin``: ``admin.audit_hold_added`` (hold id, tenant,
period, reason) and ``admin.audit_hold_released``. Order, chosen so that a failure never leaves
records unprotected without a trace: a new hold is stored first and then recorded (if the record
cannot be written the hold is withdrawn again and the error raised); a release is recorded first
and then applied (if applying fails the hold stays in force, which is the safe side).

The pruner reads holds inside its own update statements (``held_clause``), so a hold committed
before a prune batch starts is always honoured by that batch.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Column, ColumnElement, Engine, Index, String, Table, Text, and_, exists, or_, select, update
from sqlalchemy.exc import SQLAlchemyError

from appliance.audit.canonical import normalize_ts, utc_now_ts
from appliance.audit.errors import AuditError
from appliance.audit.log import AuditLog
from appliance.audit.record import ADMIN_STREAM, validate_stream
from appliance.audit.schema import audit_events, metadata

MAX_REASON = 1000

audit_legal_holds = Table(
    "audit_legal_holds",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("tenant", String(128), nullable=False),
    Column("since", String(32), nullable=True),  # RFC 3339 as the records' ts; NULL = open
    Column("until", String(32), nullable=True),
    Column("reason", Text, nullable=False),
    Column("created_at", String(32), nullable=False),
    Column("created_by", String(256), nullable=False),
    Column("released_at", String(32), nullable=True),
    Column("released_by", String(256), nullable=True),
    Index("ix_audit_legal_holds_tenant", "tenant"),
)


class HoldError(AuditError):
    """A hold could not be added or released; the message says what was expected."""


class HoldReleasedError(HoldError):
    """The hold was released already."""


@dataclass(frozen=True)
class Hold:
    id: str
    tenant: str
    since: str | None
    until: str | None
    reason: str
    created_at: str
    created_by: str
    released_at: str | None = None
    released_by: str | None = None

    @property
    def active(self) -> bool:
        return self.released_at is None

    def covers(self, ts: str) -> bool:
        return (self.since is None or ts >= self.since) and (self.until is None or ts < self.until)

    def describe(self) -> str:
        period = "every record" if self.since is None and self.until is None else (
            f"records from {self.since or 'the start'} until {self.until or 'now on'}")
        return f"hold {self.id} on tenant {self.tenant!r}: {period}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def held_clause(tenant: str) -> ColumnElement[bool]:
    """SQL: the ``audit_events`` row (of ``tenant``'s stream) lies under an active hold."""
    h, ev = audit_legal_holds.c, audit_events.c
    return exists(select(h.id).where(
        h.tenant == tenant, h.released_at.is_(None),
        or_(h.since.is_(None), ev.ts >= h.since), or_(h.until.is_(None), ev.ts < h.until)))


class HoldStore:
    """Add, list and release legal holds; each change recorded in ``log`` (actor = who did it)."""

    def __init__(self, log: AuditLog) -> None:
        self.log = log
        self.engine: Engine = log.engine
        try:
            audit_legal_holds.create(self.engine, checkfirst=True)
        except SQLAlchemyError as exc:
            raise AuditError(f"legal holds table unavailable: {type(exc).__name__}") from exc

    def add(self, tenant: str, *, reason: str, actor: str, since: str | datetime | None = None,
            until: str | datetime | None = None) -> Hold:
        try:
            validate_stream(tenant)
            if tenant == ADMIN_STREAM:
                raise ValueError(f"a hold names a tenant; {ADMIN_STREAM!r} is never pruned, found {tenant!r}")
            lower, upper = normalize_ts(since), normalize_ts(until)
        except ValueError as exc:
            raise HoldError(f"legal hold: {exc}") from None
        reason = reason.strip() if isinstance(reason, str) else ""
        if not reason or len(reason) > MAX_REASON:
            raise HoldError(f"legal hold: expected a reason of 1..{MAX_REASON} characters, found {len(reason)}")
        if lower is not None and upper is not None and lower >= upper:
            raise HoldError(f"legal hold: expected since < until, found since {lower} and until {upper}")
        hold = Hold(id="hold-" + uuid.uuid4().hex[:12], tenant=tenant, since=lower, until=upper, reason=reason,
                    created_at=utc_now_ts(), created_by=actor)
        with self.engine.begin() as conn:
            conn.execute(audit_legal_holds.insert().values(**hold.to_dict()))
        try:
            self.log.append("admin.audit_hold_added", stream=ADMIN_STREAM, actor=actor, tenant=tenant,
                            data={"hold_id": hold.id, "since": lower, "until": upper, "reason": reason})
        except AuditError:
            with self.engine.begin() as conn:  # unrecorded: withdraw it, so every hold in force is audited
                conn.execute(audit_legal_holds.delete().where(audit_legal_holds.c.id == hold.id))
            raise
        return hold

    def release(self, hold_id: str, *, actor: str) -> Hold:
        hold = self.get(hold_id)
        if not hold.active:
            raise HoldReleasedError(f"legal hold {hold_id}: expected an active hold, found one released on "
                            f"{hold.released_at} by {hold.released_by}")
        self.log.append("admin.audit_hold_released", stream=ADMIN_STREAM, actor=actor, tenant=hold.tenant,
                        data={"hold_id": hold.id, "since": hold.since, "until": hold.until})
        now = utc_now_ts()
        h = audit_legal_holds.c
        with self.engine.begin() as conn:
            conn.execute(update(audit_legal_holds).where(and_(h.id == hold_id, h.released_at.is_(None)))
                         .values(released_at=now, released_by=actor))
        return self.get(hold_id)

    def get(self, hold_id: str) -> Hold:
        with self.engine.connect() as conn:
            row = conn.execute(select(audit_legal_holds).where(audit_legal_holds.c.id == hold_id)).first()
        if row is None:
            raise HoldError(f"legal hold: expected the id of an existing hold (see `appliance audit hold list`), "
                            f"found {hold_id!r}")
        return Hold(**row._asdict())

    def list(self, tenant: str | None = None, *, include_released: bool = False) -> list[Hold]:
        h = audit_legal_holds.c
        stmt = select(audit_legal_holds).order_by(h.created_at, h.id)
        if tenant is not None:
            stmt = stmt.where(h.tenant == tenant)
        if not include_released:
            stmt = stmt.where(h.released_at.is_(None))
        with self.engine.connect() as conn:
            return [Hold(**row._asdict()) for row in conn.execute(stmt)]
