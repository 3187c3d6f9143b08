"""Fixtures: a real SQLite audit database and signing key in a temporary directory."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.audit import AuditLog


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.db"


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    return tmp_path / "secrets" / "audit-signing.key"


@pytest.fixture
def audit_log(db_path: Path, key_path: Path) -> Iterator[AuditLog]:
    log = AuditLog(f"sqlite:///{db_path}", key_path, checkpoint_every=None)
    yield log
    log.close()


def fill(log: AuditLog, stream: str, n: int, *, event_type: str = "completed") -> None:
    for i in range(n):
        log.append(event_type, stream=stream, actor="key:k1", request_id=f"{stream}-{i + 1}",
                   data={"model": "smollm2", "prompt_tokens": i, "completion_tokens": 2 * i, "n": i + 1})


def raw_sql(db_path: Path, sql: str, params: tuple[object, ...] = ()) -> None:
    """Tamper with the database behind the log's back, as an attacker with file access would."""
    conn = sqlite3.connect(db_path)
    try:
        conn.execute(sql, params)
        conn.commit()
    finally:
        conn.close()
