"""The storage layer is portable: the same log, byte for byte, on SQLite and on a live PostgreSQL.

Every test here runs on both back ends (``audit_url``/``audit_log``, see conftest.py); the
PostgreSQL run uses a fresh database on a real server.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from appliance.audit import AuditKeys, AuditLog
from appliance.audit.canonical import canonical_json
from appliance.audit.cli import run_verify
from appliance.audit.schema import metadata

from .conftest import fill, log_url, raw_sql, sql_rows


def test_every_table_is_created_and_reopening_is_idempotent(audit_url: str, key_path: Path) -> None:
    with AuditLog(audit_url, key_path, checkpoint_every=None) as first:
        fill(first, "acme", 2)
        tables = set(sa.inspect(first.engine).get_table_names())
    assert set(metadata.tables) <= tables, f"missing tables: {set(metadata.tables) - tables}"
    for i in range(2):  # creating tables and upgrading over an existing log is a no-op
        with AuditLog(audit_url, key_path, checkpoint_every=None) as again:
            assert again.append("completed", stream="acme", actor="key:k1", data={}).seq == 3 + i
            report = again.verify()
            assert report.ok, report.to_dict()
    with AuditLog(audit_url, key_path, create=False, checkpoint_every=None) as reader:
        assert [r.seq for r in reader.query("acme")] == [1, 2, 3, 4]


def test_the_database_refuses_a_second_record_at_one_seq(audit_log: AuditLog) -> None:
    fill(audit_log, "acme", 1)
    row = dict(zip(("stream", "seq", "ts", "event_type", "actor", "data", "prev_hash", "hash"),
                   sql_rows(audit_log, "SELECT stream, seq, ts, event_type, actor, data, prev_hash, hash "
                                       "FROM audit_events")[0], strict=True))
    with pytest.raises(sa.exc.IntegrityError):
        raw_sql(audit_log, "INSERT INTO audit_events (stream, seq, ts, event_type, actor, data, prev_hash, hash) "
                "VALUES (:stream, :seq, :ts, :event_type, :actor, :data, :prev_hash, :hash)", row)
    assert len(audit_log.query("acme")) == 1


def test_text_and_hashes_round_trip_exactly(audit_log: AuditLog, audit_url: str, key_path: Path) -> None:
    # NUL (PostgreSQL text cannot hold a raw one: it must stay escaped in the canonical JSON),
    # astral-plane characters (UTF-16 surrogates in some drivers), quotes and backslashes.
    data = {"nul": "a\u0000b", "astral": "🦀 𝄞", "accents": "é ü ß ñ", "quotes": "'\"\\`", "n": 2**53 - 1,
            "neg": -0.5, "nested": {"list": [None, True, False, ""]}}
    record = audit_log.append("completed", stream="acme", actor="key:k1", request_id="r-é", data=data)
    fill(audit_log, "acme", 3)  # level-1 and level-2 Merkle nodes exist now
    stored = sql_rows(audit_log, "SELECT data, ts, hash FROM audit_events WHERE stream = 'acme' AND seq = 1")
    assert stored == [(canonical_json(data), record.ts, record.hash)]
    nodes = sql_rows(audit_log, "SELECT hash FROM audit_tree_nodes")
    assert nodes and all(isinstance(h, bytes) and len(h) == 32 for (h,) in nodes), nodes[:3]
    with AuditLog(audit_url, key_path, checkpoint_every=None) as reopened:
        assert reopened.query("acme")[0] == record
        assert reopened.query("acme")[0].data == data
        assert reopened.checkpoint() and reopened.verify().ok


def test_counters_are_64_bit(audit_log: AuditLog) -> None:
    fill(audit_log, "acme", 1)
    columns = {c["name"]: c["type"] for c in sa.inspect(audit_log.engine).get_columns("audit_events")}
    for name in ("seq", "gidx"):
        # SQLite's INTEGER is always 64-bit; on PostgreSQL an INTEGER would stop at 2**31 - 1.
        assert audit_log.engine.dialect.name == "sqlite" or isinstance(columns[name], sa.BigInteger), (name, columns)


def test_verify_refuses_a_database_without_a_log(audit_backend: str, audit_url: str, key_path: Path) -> None:
    """A mistyped database is never "verified" as an empty log: exit 2 (a usage error), not 0 or 1."""
    AuditKeys(key_path)
    # SQLite: the file does not exist; PostgreSQL: the database exists but holds no audit tables.
    assert run_verify(audit_url, key=key_path) == 2
    if audit_backend == "postgresql":
        missing = make_url(audit_url).set(database="no_such_database").render_as_string(hide_password=False)
        assert run_verify(missing, key=key_path) == 2
    with AuditLog(audit_url, key_path, checkpoint_every=None) as log:
        fill(log, "acme", 1)
        assert run_verify(log_url(log), key=key_path) == 0
