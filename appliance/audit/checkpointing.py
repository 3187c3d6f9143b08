"""Database-side checkpoint work: load, find, and sign a stream's head after re-verifying it.

Signing is incremental: only the records since the stream's previous checkpoint are walked
(its own record included, so that checkpoint is re-confirmed), which keeps a checkpoint cheap
however long the stream grows. The first checkpoint of a stream walks it from genesis.
"""

from __future__ import annotations

from sqlalchemy import Connection, insert, select, union

from appliance.audit.canonical import genesis_hash, utc_now_ts
from appliance.audit.chain import ChainWalker
from appliance.audit.checkpoint import Checkpoint, sign_checkpoint
from appliance.audit.keys import AuditKeys
from appliance.audit.record import AuditRecord
from appliance.audit.schema import audit_checkpoints, audit_events


def stream_names(conn: Connection, *, include_checkpointed: bool = False) -> list[str]:
    """Streams with records (and, if asked, streams that only checkpoints remember)."""
    stmt = select(audit_events.c.stream).distinct()
    if include_checkpointed:
        stmt = union(select(audit_events.c.stream), select(audit_checkpoints.c.stream))  # type: ignore[assignment]
    return sorted(row[0] for row in conn.execute(stmt))


def load_checkpoints(conn: Connection, stream: str) -> list[Checkpoint]:
    cp = audit_checkpoints.c
    rows = conn.execute(select(audit_checkpoints).where(cp.stream == stream).order_by(cp.seq, cp.id))
    return [Checkpoint.from_row(row) for row in rows]


def latest_checkpoint_between(conn: Connection, stream: str, first_seq: int, last_seq: int) -> Checkpoint | None:
    """The newest checkpoint naming a seq in ``[first_seq, last_seq]``."""
    cp = audit_checkpoints.c
    row = conn.execute(
        select(audit_checkpoints)
        .where(cp.stream == stream, cp.seq >= first_seq, cp.seq <= last_seq)
        .order_by(cp.seq.desc(), cp.id.desc())
        .limit(1)
    ).first()
    return None if row is None else Checkpoint.from_row(row)


def checkpoint_stream(conn: Connection, keys: AuditKeys, stream: str) -> Checkpoint | None:
    """Verify ``stream`` since its last checkpoint, then sign and store its head.

    Returns ``None`` for a stream without records, and the previous checkpoint unchanged when
    the head has not moved since. Raises ``AuditIntegrityError`` (nothing signed) on any failure.
    """
    cp_cols, ev = audit_checkpoints.c, audit_events.c
    row = conn.execute(
        select(audit_checkpoints).where(cp_cols.stream == stream)
        .order_by(cp_cols.seq.desc(), cp_cols.id.desc()).limit(1)
    ).first()
    previous = None if row is None else Checkpoint.from_row(row)
    start = 1 if previous is None else previous.seq
    records = conn.execute(
        select(audit_events).where(ev.stream == stream, ev.seq >= start).order_by(ev.seq)
    )
    walker: ChainWalker | None = None
    for db_row in records.yield_per(1000):
        record = AuditRecord.from_row(db_row)
        if walker is None:
            # Record ``start``'s own prev_hash cannot be checked without walking further back;
            # its hash is pinned by the previous (signed) checkpoint instead.
            anchor = genesis_hash(stream) if start == 1 else record.prev_hash
            walker = ChainWalker(stream, anchor_prev_hash=anchor, first_seq=start,
                                 checkpoints=[] if previous is None else [previous], public_key=keys.public_key)
        walker.feed(record)
    if walker is None:
        walker = ChainWalker(stream, anchor_prev_hash=genesis_hash(stream), first_seq=start,
                             checkpoints=[] if previous is None else [previous], public_key=keys.public_key)
    failure = walker.finish(require_checkpoints_covered=True)
    if failure is not None:
        raise failure.to_error()
    head = walker.head
    if head is None:
        return None
    if previous is not None and previous.seq == head.seq and previous.hash == head.hash:
        return previous
    checkpoint = sign_checkpoint(keys, stream=stream, seq=head.seq, hash=head.hash, ts=utc_now_ts())
    conn.execute(insert(audit_checkpoints).values(**checkpoint.to_dict()))
    return checkpoint
