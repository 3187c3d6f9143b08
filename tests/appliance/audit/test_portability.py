"""The storage layer stays portable: its DDL and statements compile for PostgreSQL too.

No PostgreSQL driver is installed in this environment, so this checks compilation only; a
test against a live server belongs with the appliance's database tests.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.dialects import postgresql
from sqlalchemy.schema import CreateIndex, CreateTable

from appliance.audit.schema import audit_checkpoints, audit_events, metadata


def test_schema_compiles_for_postgresql() -> None:
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    for table in metadata.sorted_tables:
        ddl = str(CreateTable(table).compile(dialect=dialect))
        assert "BIGSERIAL" in ddl or "GENERATED" in ddl or "SERIAL" in ddl
        for index in table.indexes:
            str(CreateIndex(index).compile(dialect=dialect))
    ddl = str(CreateTable(audit_events).compile(dialect=dialect))
    assert "UNIQUE (stream, seq)" in ddl


def test_head_query_compiles_for_postgresql() -> None:
    ev = audit_events.c
    stmt = select(ev.seq, ev.hash).where(ev.stream == "acme").order_by(ev.seq.desc()).limit(1)
    sql = str(stmt.compile(dialect=postgresql.dialect()))  # type: ignore[no-untyped-call]
    assert "LIMIT" in sql and audit_checkpoints.name == "audit_checkpoints"
