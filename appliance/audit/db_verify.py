"""Verifying the log in the database: every stream's chain and tree, and the appliance-wide tree.

Needs only the audit *public* key, so a copy of the database can be checked without the
signing key (``appliance audit verify --db URL --public-key audit.pem``).

Per stream: the hash chain from genesis, the stream's Merkle tree against each of its signed
checkpoints, no checkpoint past the last record, and the version 1 checkpoints of an upgraded
log. Then ``_all``, every record in commit order: positions gapless from 0, its root against
each ``_all`` checkpoint -- so a stream deleted together with its own checkpoints is still
caught. Optionally (``unsigned_grace_s``) records older than the grace that no checkpoint
covers fail: the writer signs every second, so only a cut log or an appliance that crashed and
was not restarted leaves old records unsigned (a restart signs them after recording the crash).
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Connection, Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

from appliance.audit.canonical import canonical_json, genesis_hash
from appliance.audit.chain import ChainFailure, ChainWalker
from appliance.audit.checkpoint import GLOBAL_TREE
from appliance.audit.checkpointing import load_checkpoints, load_legacy_checkpoints, stream_names
from appliance.audit.errors import AuditError
from appliance.audit.export_format import record_line_parts
from appliance.audit.keys import key_id_of
from appliance.audit.merkle import Frontier, record_leaf
from appliance.audit.prune_check import unaccounted_prunes
from appliance.audit.record import AuditRecord, validate_stream
from appliance.audit.reports import ChainReport, StreamReport
from appliance.audit.schema import audit_events

LEGACY_CHECKPOINT_TYPE = "sovereign-audit-checkpoint/v1"
DEFAULT_UNSIGNED_GRACE_S = 60.0  # the writer signs every second: a minute is generous


def verify_database(engine: Engine, public_key: Ed25519PublicKey, stream: str | None = None, *,
                    unsigned_grace_s: float | None = None) -> ChainReport:
    """Walk ``stream`` (every stream and ``_all`` when ``None``); tampering is reported, never raised."""
    reports: list[StreamReport] = []
    cutoff = None if unsigned_grace_s is None else (
        datetime.now(UTC) - timedelta(seconds=unsigned_grace_s)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    try:
        with engine.connect() as conn, conn.begin():
            names = [validate_stream(stream)] if stream is not None else stream_names(
                conn, include_checkpointed=True)
            for name in names:
                reports.append(_verify_stream(conn, public_key, name, cutoff))
            if stream is None:
                reports.append(_verify_global(conn, public_key, cutoff))
    except SQLAlchemyError as exc:
        raise AuditError(f"audit verification could not read the database: {type(exc).__name__}") from exc
    return ChainReport(streams=tuple(reports))


def _verify_stream(conn: Connection, public_key: Ed25519PublicKey, name: str, cutoff: str | None) -> StreamReport:
    ev = audit_events.c
    # Checkpoints first: on a database without snapshot reads, records appended meanwhile can
    # only extend the tree past them, never contradict them.
    cps = load_checkpoints(conn, name)
    legacy = {row.seq: row for row in load_legacy_checkpoints(conn, name)}
    legacy_failure = _legacy_signature_failure(public_key, name, legacy.values())
    walker = ChainWalker(name, anchor_prev_hash=genesis_hash(name), checkpoints=cps, public_key=public_key)
    rows = conn.execute(select(audit_events).where(ev.stream == name).order_by(ev.seq))
    for row in rows.yield_per(1000):
        record = AuditRecord.from_row(row)
        pruned = row.pruned_at is not None
        walker.feed(record, pruned=pruned, body_text=None if pruned else "".join(record_line_parts(row)))
        old = legacy.pop(record.seq, None)
        if old is not None and old.hash != record.hash and legacy_failure is None:
            legacy_failure = ChainFailure(name, record.seq, "checkpoint", f"hash {old.hash} (version 1 checkpoint)",
                                          f"hash {record.hash}")
    if legacy and legacy_failure is None:
        seq = min(legacy)
        legacy_failure = ChainFailure(name, seq, "truncation", f"a record at seq {seq} (version 1 checkpoint)",
                                      f"last record seq {walker.head.seq if walker.head else 0}")
    failure = walker.finish(require_checkpoints_covered=True)
    signed = max((c.size for c in cps), default=0)
    # a body erased behind the log's back passes the chain walk (its hash stays): every pruned
    # record must lie in a signed retention record's range
    erased = next(iter(unaccounted_prunes(conn, name, limit=1)), None)
    failure = _first(failure, legacy_failure, _unsigned(name, walker.head, signed, cutoff, conn), erased)
    return StreamReport(
        stream=name, records=walker.records,
        head_seq=None if walker.head is None else walker.head.seq,
        head_hash=None if walker.head is None else walker.head.hash,
        checkpoints=len(cps) + len(legacy), last_checkpoint_seq=max((c.size for c in cps), default=None),
        failure=failure,
    )


def _verify_global(conn: Connection, public_key: Ed25519PublicKey, cutoff: str | None) -> StreamReport:
    ev = audit_events.c
    cps = load_checkpoints(conn, GLOBAL_TREE)
    by_size: dict[int, list[str]] = {}
    failure: ChainFailure | None = None
    for cp in cps:
        problem = cp.signature_problem(public_key)
        if problem is not None and failure is None:
            failure = ChainFailure(GLOBAL_TREE, cp.size, "checkpoint signature", problem, "")
        by_size.setdefault(cp.size, []).append(cp.root)
    unindexed = conn.execute(select(func.count()).select_from(audit_events).where(ev.gidx.is_(None))).scalar() or 0
    frontier = Frontier()
    last_ts = None
    rows = conn.execute(select(ev.gidx, ev.hash, ev.ts, ev.stream, ev.seq).where(ev.gidx.is_not(None))
                        .order_by(ev.gidx))
    for row in rows.yield_per(5000):
        if failure is None and row.gidx != frontier.size:
            failure = ChainFailure(GLOBAL_TREE, frontier.size + 1, "seq", f"the record at position {frontier.size}",
                                   f"position {row.gidx} ({row.stream} seq {row.seq}): records deleted")
        frontier.append(record_leaf(row.hash))
        last_ts = row.ts
        roots = by_size.pop(frontier.size, None)
        if roots and failure is None:
            root = frontier.root().hex()
            bad = [r for r in roots if r != root]
            if bad:
                failure = ChainFailure(GLOBAL_TREE, frontier.size, "checkpoint", f"root {bad[0]} (signed)",
                                       f"root {root}")
    if failure is None and by_size:
        size = min(by_size)
        failure = ChainFailure(GLOBAL_TREE, size, "truncation", f"{size} records (signed checkpoint)",
                               f"{frontier.size} records")
    if failure is None and unindexed and (cps or frontier.size):
        failure = ChainFailure(GLOBAL_TREE, None, "tree", "every record in the appliance-wide tree",
                               f"{unindexed} records outside it")
    signed = max((c.size for c in cps), default=0)
    if failure is None and cutoff is not None and frontier.size > signed:
        first_unsigned = conn.execute(select(ev.ts).where(ev.gidx == signed)).scalar()
        if first_unsigned is not None and first_unsigned < cutoff:
            failure = ChainFailure(GLOBAL_TREE, signed + 1, "unsigned",
                                   f"every record older than {cutoff} under a signed checkpoint",
                                   f"{frontier.size - signed} records unsigned since {first_unsigned}")
    del last_ts
    return StreamReport(stream=GLOBAL_TREE, records=frontier.size, head_seq=frontier.size or None,
                        head_hash=frontier.root().hex() if frontier.size else None, checkpoints=len(cps),
                        last_checkpoint_seq=signed or None, failure=failure)


def _unsigned(name: str, head: AuditRecord | None, signed: int, cutoff: str | None,
              conn: Connection) -> ChainFailure | None:
    if cutoff is None or head is None or head.seq <= signed:
        return None
    ev = audit_events.c
    first_ts = conn.execute(select(ev.ts).where(ev.stream == name, ev.seq == signed + 1)).scalar()
    if first_ts is None or first_ts >= cutoff:
        return None
    return ChainFailure(name, signed + 1, "unsigned", f"every record older than {cutoff} under a signed checkpoint",
                        f"{head.seq - signed} records unsigned since {first_ts} (the log was cut, or the "
                        "appliance stopped uncleanly and has not been restarted to sign them)")


def _legacy_signature_failure(public_key: Ed25519PublicKey, name: str, rows: object) -> ChainFailure | None:
    expected_id = key_id_of(public_key)
    for row in rows:  # type: ignore[attr-defined]
        payload = {"type": LEGACY_CHECKPOINT_TYPE, "stream": row.stream, "seq": row.seq, "hash": row.hash,
                   "ts": row.ts, "key_id": row.key_id}
        try:
            if row.key_id != expected_id:
                raise InvalidSignature
            public_key.verify(base64.b64decode(row.signature, validate=True), canonical_json(payload).encode())
        except (InvalidSignature, ValueError):
            return ChainFailure(name, row.seq, "checkpoint signature",
                                "a valid version 1 checkpoint signature by the audit key", "an invalid one")
    return None


def _first(*failures: ChainFailure | None) -> ChainFailure | None:
    found = [f for f in failures if f is not None]
    return min(found, key=lambda f: f.seq or 0) if found else None
