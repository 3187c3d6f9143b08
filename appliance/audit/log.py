"""``AuditLog``: append records to per-stream hash chains and Merkle trees, verify, sign checkpoints.

Appends go through one group-commit writer (``writer.GroupWriter``): ``append`` blocks the
calling thread and ``append_async`` the awaiting coroutine -- never the event loop -- until the
record is committed, on disk, together with every other record queued meanwhile. Any failure
raises ``AuditError`` with nothing recorded, so callers can fail closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from appliance.audit.canonical import canonical_json, normalize_ts
from appliance.audit.checkpoint import GLOBAL_TREE, Checkpoint
from appliance.audit.checkpointing import load_checkpoints, stream_names
from appliance.audit.db_verify import verify_database
from appliance.audit.errors import AuditError, AuditInvalidEventError
from appliance.audit.keys import AuditKeys
from appliance.audit.record import AuditRecord, validate_append, validate_stream
from appliance.audit.reports import ChainReport
from appliance.audit.schema import audit_events, make_engine
from appliance.audit.secrets_guard import check_no_secrets
from appliance.audit.writer import CheckpointRequest, GroupWriter, Pending

log = logging.getLogger("appliance.audit")


class AuditLog:
    """The audit log in the database at ``url``, signing with the key at ``signing_key_path``.

    ``checkpoint_every``: sign every tree that grew as soon as one passes a multiple of this
    many records, and ``checkpoint_interval_s`` after the first unsigned record in any case, so
    a crash leaves at most about that long unsigned; ``checkpoint_every=None`` turns automatic
    checkpoints off (explicit ``checkpoint()`` calls only). ``on_checkpoints`` is called, on the
    writer thread, with every batch of new checkpoints (publication off the box).
    ``create``: create the key file, database file and tables when absent (``False`` for tools
    that must only read an existing log, such as ``appliance audit verify``).
    """

    def __init__(
        self, url: str, signing_key_path: Path, *, checkpoint_every: int | None = 1000,
        checkpoint_interval_s: float = 1.0, max_data_bytes: int = 64 * 1024, busy_timeout_s: float = 30.0,
        max_retries: int = 5, create: bool = True, max_batch: int = 512,
        on_checkpoints: Callable[[list[Checkpoint]], None] | None = None,
    ) -> None:
        if checkpoint_every is not None and checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1 or None, found {checkpoint_every}")
        if checkpoint_interval_s <= 0:
            raise ValueError(f"checkpoint_interval_s must be > 0, found {checkpoint_interval_s}")
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
        self.writer = GroupWriter(
            self.engine, self.keys, every=checkpoint_every,
            interval_s=None if checkpoint_every is None else checkpoint_interval_s,
            max_batch=max_batch, max_retries=max_retries, on_checkpoints=on_checkpoints)

    # -- writing -------------------------------------------------------------------------

    def append(
        self, event_type: str, *, stream: str, actor: str, tenant: str | None = None,
        request_id: str | None = None, data: dict[str, Any],
    ) -> AuditRecord:
        """Commit one record durably and return it; ``AuditError`` means nothing was recorded."""
        return self._submit(event_type, stream, actor, tenant, request_id, data).future.result()

    async def append_async(
        self, event_type: str, *, stream: str, actor: str, tenant: str | None = None,
        request_id: str | None = None, data: dict[str, Any],
    ) -> AuditRecord:
        """``append`` for coroutines: waits for the shared commit without blocking the event loop."""
        pending = self._submit(event_type, stream, actor, tenant, request_id, data)
        return await asyncio.wrap_future(pending.future)

    def _submit(self, event_type: str, stream: str, actor: str, tenant: str | None, request_id: str | None,
                data: dict[str, Any]) -> Pending:
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
        pending = Pending(stream, fields, data_text)
        self.writer.submit(pending)
        return pending

    def checkpoint(self, stream: str | None = None) -> list[Checkpoint]:
        """Sign the head of ``stream`` and of ``_all`` (every tree that is not signed at its head
        when ``None``) and return the new checkpoints.

        What is signed is re-checked first, from each tree's newest checkpoint: a head is never
        signed over a record that no longer hashes to what was written. Trees that check are
        signed even if another fails; the first failure is then raised as ``AuditIntegrityError``.
        """
        request = CheckpointRequest(None if stream is None else validate_stream(stream))
        self.writer.submit(request)
        return request.future.result()

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
        """Stored checkpoints of tree ``stream`` (or ``_all``), oldest first (signatures not checked here)."""
        with self.engine.connect() as conn, conn.begin():
            return load_checkpoints(conn, stream if stream == GLOBAL_TREE else validate_stream(stream))

    def streams(self) -> list[str]:
        with self.engine.connect() as conn, conn.begin():
            return stream_names(conn, include_checkpointed=True)

    def verify(self, stream: str | None = None, *, unsigned_grace_s: float | None = None) -> ChainReport:
        """Walk every chain and tree (or one stream's) from genesis against the signed checkpoints.
        A value: it never raises for tampering (``report.raise_for_failure()`` does).
        ``unsigned_grace_s``: records older than this that no checkpoint covers fail (``None``: off)."""
        return verify_database(self.engine, self.keys.public_key, stream, unsigned_grace_s=unsigned_grace_s)

    def public_key_pem(self) -> bytes:
        return self.keys.public_key_pem()

    # -- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        """Commit what is queued, sign what grew (when checkpoints are automatic), release the database."""
        self.writer.close()
        self.engine.dispose()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

