"""Verifying the chains in the database: every stream from genesis, against its checkpoints.

Needs only the audit *public* key, so a copy of the database can be checked without the
signing key (``appliance audit verify --db URL --public-key audit.pem``).
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError

from appliance.audit.canonical import genesis_hash
from appliance.audit.chain import ChainWalker
from appliance.audit.checkpointing import load_checkpoints, stream_names
from appliance.audit.errors import AuditError
from appliance.audit.record import AuditRecord, validate_stream
from appliance.audit.reports import ChainReport, StreamReport
from appliance.audit.schema import audit_events


def verify_database(engine: Engine, public_key: Ed25519PublicKey, stream: str | None = None) -> ChainReport:
    """Walk ``stream`` (every stream when ``None``); tampering is reported, never raised."""
    reports: list[StreamReport] = []
    ev = audit_events.c
    try:
        with engine.connect() as conn, conn.begin():
            names = [validate_stream(stream)] if stream is not None else stream_names(
                conn, include_checkpointed=True)
            for name in names:
                # Checkpoints first: on a database without snapshot reads, records appended
                # meanwhile can only extend the chain past them, never contradict them.
                cps = load_checkpoints(conn, name)
                walker = ChainWalker(name, anchor_prev_hash=genesis_hash(name), checkpoints=cps,
                                     public_key=public_key)
                rows = conn.execute(select(audit_events).where(ev.stream == name).order_by(ev.seq))
                for row in rows.yield_per(1000):
                    walker.feed(AuditRecord.from_row(row))
                failure = walker.finish(require_checkpoints_covered=True)
                reports.append(StreamReport(
                    stream=name, records=walker.records,
                    head_seq=None if walker.head is None else walker.head.seq,
                    head_hash=None if walker.head is None else walker.head.hash,
                    checkpoints=len(cps), last_checkpoint_seq=max((c.seq for c in cps), default=None),
                    failure=failure,
                ))
    except SQLAlchemyError as exc:
        raise AuditError(f"audit verification could not read the database: {type(exc).__name__}") from exc
    return ChainReport(streams=tuple(reports))
