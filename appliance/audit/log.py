"""``AuditLog``: append records to per-stream hash chains, verify them, sign checkpoints.

Every append is one write transaction (``BEGIN IMMEDIATE`` on SQLite) that reads the stream's
head and inserts the next record; it is committed -- on disk -- before ``append`` returns, and
any failure raises ``AuditError`` with nothing recorded, so callers can fail closed. Appends
are serialised by a lock within the process and by the database across processes; on
PostgreSQL a racing writer hits the unique ``(stream, seq)`` constraint and retries.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from sqlalchemy import Connection, insert, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from appliance.audit.canonical import canonical_json, genesis_hash, normalize_ts, utc_now_ts
from appliance.audit.checkpoint import Checkpoint
from appliance.audit.checkpointing import checkpoint_stream, load_checkpoints, stream_names
from appliance.audit.db_verify import verify_database
from appliance.audit.errors import AuditError, AuditIntegrityError, AuditInvalidEventError
from appliance.audit.keys import AuditKeys
from appliance.audit.record import AuditRecord, compute_record_hash, validate_append, validate_stream
from appliance.audit.reports import ChainReport
from appliance.audit.schema import WRITE_OPTION, audit_events, make_engine
from appliance.audit.secrets_guard import check_no_secrets

log = logging.getLogger("appliance.audit")


class AuditLog:
    """The audit log in the database at ``url``, signing with the key at ``signing_key_path``.

    ``checkpoint_every``: sign a stream's head automatically each time its seq reaches a
    multiple of this (``None`` for explicit ``checkpoint()`` calls only). Records after a
    stream's last checkpoint are protected by the chain alone: call ``checkpoint()`` on a timer.
    ``create``: create the key file, database file and tables when absent (``False`` for tools
    that must only read an existing log, such as ``appliance audit verify``).
    """

    def __init__(
        self, url: str, signing_key_path: Path, *, checkpoint_every: int | None = 100,
        max_data_bytes: int = 64 * 1024, busy_timeout_s: float = 30.0, max_retries: int = 5,
        create: bool = True,
    ) -> None:
        if checkpoint_every is not None and checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1 or None, found {checkpoint_every}")
        if max_data_bytes < 2 or max_retries < 1 or busy_timeout_s <= 0:
            raise ValueError(
                "max_data_bytes >= 2, max_retries >= 1, busy_timeout_s > 0 expected, found "
                f"{max_data_bytes}, {max_retries}, {busy_timeout_s}"
            )
        self.keys = AuditKeys(signing_key_path, create=create)
        self.checkpoint_every = checkpoint_every
        self.max_data_bytes = max_data_bytes
        self.max_retries = max_retries
        try:
            self.engine = make_engine(url, busy_timeout_s=busy_timeout_s, create=create)
        except (SQLAlchemyError, FileNotFoundError) as exc:
            reason = exc if isinstance(exc, FileNotFoundError) else type(exc).__name__
            raise AuditError(f"audit database unavailable: {reason}") from exc
        self._lock = threading.Lock()

    # -- writing -------------------------------------------------------------------------

    def append(
        self, event_type: str, *, stream: str, actor: str, tenant: str | None = None,
        request_id: str | None = None, data: dict[str, Any],
    ) -> AuditRecord:
        """Commit one record durably and return it; ``AuditError`` means nothing was recorded."""
        try:
            tenant = validate_append(event_type, stream, actor, tenant, request_id)
            if not isinstance(data, dict):
                raise ValueError(f"audit data must be a dict, found {type(data).__name__}")
        except ValueError as exc:
            raise AuditInvalidEventError(str(exc)) from None
        check_no_secrets(data)
        try:
            data_text = canonical_json(data)
        except AuditError as exc:
            raise AuditInvalidEventError(str(exc)) from None
        size = len(data_text.encode("utf-8"))
        if size > self.max_data_bytes:
            raise AuditInvalidEventError(
                f"audit data too large: expected at most {self.max_data_bytes} bytes, found {size}")
        fields = {"event_type": event_type, "actor": actor, "tenant": tenant, "request_id": request_id,
                  "data": json.loads(data_text)}
        with self._lock:
            record = self._append_with_retries(stream, fields, data_text)
        if self.checkpoint_every is not None and record.seq % self.checkpoint_every == 0:
            try:
                self.checkpoint(stream)
            except AuditError as exc:  # the record stands; the failure shows in verify()
                log.error("audit auto-checkpoint of stream %r refused: %s", stream, exc)
        return record

    def _append_with_retries(self, stream: str, fields: dict[str, Any], data_text: str) -> AuditRecord:
        for _attempt in range(self.max_retries):
            try:
                with self.engine.connect() as conn:
                    conn.execution_options(**{WRITE_OPTION: True})
                    with conn.begin():
                        return self._insert_next(conn, stream, fields, data_text)
            except IntegrityError:
                continue  # another writer took this seq first; read the new head and retry
            except SQLAlchemyError as exc:
                # The driver's own message only: SQLAlchemy's text would quote the parameters.
                reason = str(getattr(exc, "orig", None) or type(exc).__name__)[:200]
                raise AuditError(f"audit append to stream {stream!r} failed, nothing recorded: {reason}") from exc
        raise AuditError(f"audit append to stream {stream!r} failed after {self.max_retries} seq conflicts")

    def _insert_next(self, conn: Connection, stream: str, fields: dict[str, Any], data_text: str) -> AuditRecord:
        ev = audit_events.c
        head = conn.execute(
            select(ev.seq, ev.hash, ev.ts).where(ev.stream == stream).order_by(ev.seq.desc()).limit(1)
        ).first()
        now = utc_now_ts()
        # Timestamps never go backwards in a stream (a clock step back is absorbed), so a time
        # range always selects a contiguous run of seqs.
        ts = now if head is None or now >= head.ts else head.ts
        body = {"stream": stream, "seq": 1 if head is None else head.seq + 1, "ts": ts, **fields,
                "prev_hash": genesis_hash(stream) if head is None else head.hash}
        record = AuditRecord(**body, hash=compute_record_hash(body))
        conn.execute(insert(audit_events).values(**{**record.to_dict(), "data": data_text}))
        return record

    def checkpoint(self, stream: str | None = None) -> list[Checkpoint]:
        """Sign the head of ``stream`` (every stream when ``None``) and store the checkpoints.

        The chain since each stream's previous checkpoint is verified first: a head is never
        signed over a broken chain. Streams that verify are signed even if another fails; the
        first failure is then raised as ``AuditIntegrityError``.
        """
        signed: list[Checkpoint] = []
        failures: list[AuditIntegrityError] = []
        try:
            with self._lock, self.engine.connect() as conn:
                conn.execution_options(**{WRITE_OPTION: True})
                with conn.begin():
                    names = [validate_stream(stream)] if stream is not None else stream_names(conn)
                    for name in names:
                        try:
                            cp = checkpoint_stream(conn, self.keys, name)
                        except AuditIntegrityError as exc:
                            failures.append(exc)
                            continue
                        if cp is not None:
                            signed.append(cp)
        except SQLAlchemyError as exc:
            raise AuditError(f"audit checkpoint failed, nothing signed: {type(exc).__name__}") from exc
        if failures:
            raise failures[0]
        return signed

    # -- reading -------------------------------------------------------------------------

    def query(
        self, stream: str, since: str | datetime | None = None, until: str | datetime | None = None,
        *, limit: int | None = None,
    ) -> list[AuditRecord]:
        """Records of one stream with ``since <= ts < until`` (either bound optional), in seq order."""
        return list(self.iter_records(stream, since, until, limit=limit))

    def iter_records(
        self, stream: str, since: str | datetime | None = None, until: str | datetime | None = None,
        *, limit: int | None = None,
    ) -> Iterator[AuditRecord]:
        validate_stream(stream)
        lower, upper = normalize_ts(since), normalize_ts(until)
        ev = audit_events.c
        stmt = select(audit_events).where(ev.stream == stream).order_by(ev.seq)
        if lower is not None:
            stmt = stmt.where(ev.ts >= lower)
        if upper is not None:
            stmt = stmt.where(ev.ts < upper)
        if limit is not None:
            stmt = stmt.limit(limit)
        try:
            with self.engine.connect() as conn, conn.begin():
                for row in conn.execute(stmt).yield_per(1000):
                    yield AuditRecord.from_row(row)
        except SQLAlchemyError as exc:
            raise AuditError(f"audit query of stream {stream!r} failed: {type(exc).__name__}") from exc

    def checkpoints(self, stream: str) -> list[Checkpoint]:
        """Stored checkpoints of ``stream``, oldest first (signatures not checked here)."""
        with self.engine.connect() as conn, conn.begin():
            return load_checkpoints(conn, validate_stream(stream))

    def streams(self) -> list[str]:
        with self.engine.connect() as conn, conn.begin():
            return stream_names(conn, include_checkpointed=True)

    def verify(self, stream: str | None = None) -> ChainReport:
        """Walk every chain (or one) from genesis against the signed checkpoints. A value: it
        never raises for tampering (``report.raise_for_failure()`` does)."""
        return verify_database(self.engine, self.keys.public_key, stream)

    def public_key_pem(self) -> bytes:
        return self.keys.public_key_pem()

    # -- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

