"""Tampering with the database behind the log's back is detected, naming the stream and seq."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.audit import AuditIntegrityError, AuditKeys, AuditLog
from appliance.audit.checkpoint import sign_checkpoint
from appliance.audit.record import compute_record_hash

from .conftest import fill, raw_sql


@pytest.fixture
def filled(audit_log: AuditLog) -> AuditLog:
    fill(audit_log, "acme", 6)
    fill(audit_log, "globex", 3)
    audit_log.checkpoint()
    assert audit_log.verify().ok
    return audit_log


def _failure(log: AuditLog) -> tuple[str, int | None, str]:
    report = log.verify()
    assert not report.ok
    failure = report.first_failure
    assert failure is not None
    others = [s for s in report.streams if s.stream not in (failure.stream, "_all")]
    assert all(s.ok for s in others), "tampering with one stream must not fail the others"
    return failure.stream, failure.seq, failure.check


def test_edited_record_is_detected(filled: AuditLog) -> None:
    raw_sql(filled, "UPDATE audit_events SET data = ? WHERE stream = 'acme' AND seq = 3",
            (json.dumps({"model": "smollm2", "prompt_tokens": 999}),))
    assert _failure(filled) == ("acme", 3, "hash")
    with pytest.raises(AuditIntegrityError) as info:
        filled.verify().raise_for_failure()
    assert (info.value.seq, info.value.stream) == (3, "acme")
    assert info.value.expected != info.value.found


@pytest.mark.parametrize("column, value", [("actor", "key:someone-else"), ("ts", "2020-01-01T00:00:00.000000Z"),
                                           ("event_type", "completed2"), ("tenant", "globex")])
def test_edited_field_is_detected(filled: AuditLog, column: str, value: str) -> None:
    raw_sql(filled, f"UPDATE audit_events SET {column} = ? WHERE stream = 'acme' AND seq = 2", (value,))
    assert _failure(filled)[:2] == ("acme", 2)


def test_edited_record_with_recomputed_hash_breaks_the_next_link(filled: AuditLog) -> None:
    record = filled.query("acme")[2]
    body = {**record.body(), "data": {"forged": True}}
    raw_sql(filled, "UPDATE audit_events SET data = ?, hash = ? WHERE stream = 'acme' AND seq = 3",
            (json.dumps(body["data"]), compute_record_hash(body)))
    assert _failure(filled) == ("acme", 4, "prev_hash")


def test_deleted_record_is_detected(filled: AuditLog) -> None:
    raw_sql(filled, "DELETE FROM audit_events WHERE stream = 'acme' AND seq = 4")
    stream, seq, check = _failure(filled)
    assert (stream, seq, check) == ("acme", 4, "seq")
    assert filled.verify().first_failure.found == "seq 5"  # type: ignore[union-attr]


def test_reordered_records_are_detected(filled: AuditLog) -> None:
    raw_sql(filled, "UPDATE audit_events SET seq = -1 WHERE stream = 'acme' AND seq = 2")
    raw_sql(filled, "UPDATE audit_events SET seq = 2 WHERE stream = 'acme' AND seq = 3")
    raw_sql(filled, "UPDATE audit_events SET seq = 3 WHERE stream = 'acme' AND seq = -1")
    assert _failure(filled)[:2] == ("acme", 2)


def test_inserted_record_is_detected(filled: AuditLog) -> None:
    records = filled.query("acme")
    for seq in range(6, 2, -1):  # make room at seq 3
        raw_sql(filled, "UPDATE audit_events SET seq = seq + 1 WHERE stream = 'acme' AND seq = ?", (seq,))
    body = {**records[2].body(), "prev_hash": records[1].hash, "data": {"forged": True}}
    forged = {**body, "data": json.dumps(body["data"]), "hash": compute_record_hash(body)}
    raw_sql(filled, "INSERT INTO audit_events (stream, seq, ts, event_type, actor, tenant, request_id, data, "
            "prev_hash, hash) VALUES (:stream, :seq, :ts, :event_type, :actor, :tenant, :request_id, :data, "
            ":prev_hash, :hash)", forged)  # type: ignore[arg-type]
    assert _failure(filled) == ("acme", 4, "prev_hash")


def test_truncated_tail_is_detected_by_the_signed_checkpoint(filled: AuditLog) -> None:
    raw_sql(filled, "DELETE FROM audit_events WHERE stream = 'acme' AND seq >= 5")
    assert _failure(filled) == ("acme", 6, "truncation")


def test_a_wholly_deleted_stream_is_detected(filled: AuditLog) -> None:
    raw_sql(filled, "DELETE FROM audit_events WHERE stream = 'globex'")
    assert _failure(filled) == ("globex", 3, "truncation")


def test_forged_checkpoint_is_detected(filled: AuditLog) -> None:
    raw_sql(filled, "UPDATE audit_tree_checkpoints SET size = 5 WHERE tree = 'acme'")
    assert _failure(filled) == ("acme", 5, "checkpoint signature")


def test_checkpoint_refuses_to_sign_a_broken_chain(filled: AuditLog) -> None:
    fill(filled, "acme", 2)  # seq 7, 8: after the checkpoint at 6
    raw_sql(filled, "UPDATE audit_events SET actor = 'x' WHERE stream = 'acme' AND seq = 7")
    with pytest.raises(AuditIntegrityError) as info:
        filled.checkpoint()
    assert (info.value.stream, info.value.seq) == ("acme", 7)
    assert [c.seq for c in filled.checkpoints("acme")] == [6]  # nothing new signed for acme
    fill(filled, "globex", 1)
    with pytest.raises(AuditIntegrityError):
        filled.checkpoint()
    assert [c.seq for c in filled.checkpoints("globex")] == [3, 4]  # healthy streams still signed


def test_a_checkpoint_signed_by_another_key_is_detected(filled: AuditLog, tmp_path: Path) -> None:
    real = filled.checkpoints("acme")[-1]
    forged = sign_checkpoint(AuditKeys(tmp_path / "other.key"), tree="acme", size=real.size,
                             root=bytes.fromhex(real.root), ts=real.ts)
    raw_sql(filled, "INSERT INTO audit_tree_checkpoints (tree, size, root, ts, key_id, note) "
            "VALUES (:tree, :size, :root, :ts, :key_id, :note)", forged.to_dict())  # type: ignore[arg-type]
    assert _failure(filled) == ("acme", 6, "checkpoint signature")
    fill(filled, "acme", 1)
    with pytest.raises(AuditIntegrityError, match="key_id"):
        filled.checkpoint("acme")  # and no new head is signed over it
    assert [c.size for c in filled.checkpoints("acme")] == [6, 6]
