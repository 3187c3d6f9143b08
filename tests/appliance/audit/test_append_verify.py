"""Appending records and verifying the chains they form, on a real SQLite file and a real PostgreSQL."""

from __future__ import annotations

import json
import re
import sqlite3
import stat
from pathlib import Path

import pytest

from appliance.audit import (
    AuditError,
    AuditInvalidEventError,
    AuditKeys,
    AuditLog,
    AuditSecretError,
)
from appliance.audit.canonical import genesis_hash, sha256_hex

from .conftest import fill, sql_rows, sqlite_only

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def test_append_builds_a_gapless_chain_per_stream(audit_log: AuditLog) -> None:
    fill(audit_log, "acme", 3)
    fill(audit_log, "globex", 2)
    audit_log.append("admin.tenant_created", stream="_admin", actor="admin", tenant="acme", data={"name": "acme"})
    acme = audit_log.query("acme")
    assert [r.seq for r in acme] == [1, 2, 3]
    assert [r.seq for r in audit_log.query("globex")] == [1, 2]
    assert acme[0].prev_hash == genesis_hash("acme") == sha256_hex("sovereign-audit-genesis:acme")
    assert [r.prev_hash for r in acme[1:]] == [r.hash for r in acme[:-1]]
    assert all(TS.match(r.ts) and r.tenant == "acme" for r in acme)
    assert all(r.hash == r.compute_hash() for r in acme)
    report = audit_log.verify()
    assert report.ok and report.first_failure is None
    assert (report.streams_checked, report.records_checked) == (3, 6)
    assert [s.stream for s in report.streams] == ["_admin", "acme", "globex", "_all"]


def test_records_are_durable_and_stored_as_canonical_json(audit_url: str, audit_backend: str, key_path: Path) -> None:
    with AuditLog(audit_url, key_path) as log:
        record = log.append("accepted", stream="acme", actor="key:k1", request_id="r1",
                            data={"b": 1, "a": "é", "nested": {"z": [1, 2.5]}})
    rows = sql_rows(audit_url, "SELECT seq, data, hash FROM audit_events")
    assert rows == [(1, '{"a":"é","b":1,"nested":{"z":[1,2.5]}}', record.hash)]
    if audit_backend == "sqlite":
        assert sql_rows(audit_url, "PRAGMA journal_mode") == [("wal",)]
    with AuditLog(audit_url, key_path) as reopened:
        assert reopened.query("acme") == [record]
        assert reopened.append("completed", stream="acme", actor="key:k1", data={}).seq == 2
        assert reopened.verify().ok


def test_query_by_period_is_half_open(audit_log: AuditLog) -> None:
    fill(audit_log, "acme", 4)
    records = audit_log.query("acme")
    since, until = records[1].ts, records[3].ts
    picked = audit_log.query("acme", since=since, until=until)
    assert picked == [r for r in records if since <= r.ts < until]
    assert picked[0].seq == 2 and records[3] not in picked
    assert audit_log.query("acme", until="1970-01-01T00:00:00Z") == []
    assert [r.seq for r in audit_log.query("acme", since="1970-01-01T00:00:00+00:00")] == [1, 2, 3, 4]
    with pytest.raises(ValueError):
        audit_log.query("acme", since="yesterday")


@pytest.mark.parametrize("key", ["api_key", "Authorization", "client_secret", "password", "apiKey",
                                 "token", "x-api-key", "private_key"])
def test_secret_looking_data_keys_are_rejected(audit_log: AuditLog, key: str) -> None:
    with pytest.raises(AuditSecretError) as info:
        audit_log.append("accepted", stream="acme", actor="key:k1", data={"headers": {key: "sk-do-not-log"}})
    assert "sk-do-not-log" not in str(info.value)
    assert isinstance(info.value, AuditError)
    assert audit_log.query("acme") == []  # nothing recorded


def test_token_counts_and_key_ids_are_not_secrets(audit_log: AuditLog) -> None:
    audit_log.append("completed", stream="acme", actor="key:k1",
                     data={"prompt_tokens": 3, "completion_tokens": 4, "key_id": "k1", "max_tokens": 8})


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"event_type": "deleted"}, "event_type"),
    ({"event_type": "admin."}, "event_type"),
    ({"stream": "_other"}, "stream"),
    ({"stream": ""}, "stream"),
    ({"actor": ""}, "actor"),
    ({"tenant": "globex"}, "own tenant"),
    ({"data": {"when": object()}}, "plain JSON"),
    ({"data": {"x": float("nan")}}, "plain JSON"),
    ({"data": {"blob": "x" * 70_000}}, "too large"),
])
def test_malformed_appends_are_refused(audit_log: AuditLog, kwargs: dict[str, object], fragment: str) -> None:
    args: dict[str, object] = {"event_type": "accepted", "stream": "acme", "actor": "key:k1", "data": {}}
    args.update(kwargs)
    event_type = args.pop("event_type")
    with pytest.raises(AuditInvalidEventError, match=fragment):
        audit_log.append(event_type, **args)  # type: ignore[arg-type]
    assert audit_log.query("acme") == []


@sqlite_only  # SQLite's file lock and busy timeout
def test_append_fails_closed_when_the_database_is_unwritable(audit_log: AuditLog, db_path: Path) -> None:
    fill(audit_log, "acme", 1)
    blocker = sqlite3.connect(db_path, timeout=0)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock past the busy timeout
    try:
        slow = AuditLog(f"sqlite:///{db_path}", audit_log.keys.path, busy_timeout_s=0.2)
        with pytest.raises(AuditError, match="nothing recorded"):
            slow.append("accepted", stream="acme", actor="key:k1", data={"prompt_tokens": 1})
        slow.close()
    finally:
        blocker.rollback()
        blocker.close()
    assert [r.seq for r in audit_log.query("acme")] == [1]


def test_signing_key_is_created_0600_and_reused(key_path: Path) -> None:
    first = AuditKeys(key_path)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_path.parent.stat().st_mode) == 0o700
    second = AuditKeys(key_path)
    assert first.key_id == second.key_id and first.public_key_pem() == second.public_key_pem()
    assert second.public_key_pem().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert "PRIVATE" not in repr(second)
    key_path.chmod(0o644)
    with pytest.raises(AuditError, match="0600"):
        AuditKeys(key_path)
    with pytest.raises(AuditError, match="found none"):
        AuditKeys(key_path.with_name("absent.key"), create=False)


def test_checkpoints_sign_each_stream_head(audit_log: AuditLog) -> None:
    fill(audit_log, "acme", 3)
    fill(audit_log, "globex", 1)
    signed = audit_log.checkpoint()
    assert [(c.stream, c.seq) for c in signed] == [("_all", 4), ("acme", 3), ("globex", 1)]
    assert all(c.signature_problem(audit_log.keys.public_key) is None for c in signed)
    assert audit_log.checkpoint() == []  # unchanged heads are not signed again
    assert len(audit_log.checkpoints("acme")) == 1


def test_auto_checkpoint_every_n_records(audit_url: str, key_path: Path) -> None:
    with AuditLog(audit_url, key_path, checkpoint_every=4) as log:
        fill(log, "acme", 9)
        assert [c.seq for c in log.checkpoints("acme")] == [4, 8]
        report = log.verify("acme")
        assert report.ok and report.streams[0].last_checkpoint_seq == 8


def test_record_hash_is_reproducible_from_the_documented_rule(audit_log: AuditLog) -> None:
    record = audit_log.append("accepted", stream="acme", actor="key:k1", data={"n": 1})
    body = {k: v for k, v in record.to_dict().items() if k != "hash"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert sha256_hex(text) == record.hash
