"""Fixtures: a real audit database on each back end, and a signing key, in a temporary directory.

Every test that takes ``audit_log`` (or ``audit_url``) runs twice: on SQLite (a file in the test's
temp dir) and on PostgreSQL (a fresh database on a real server: tests/pg.py; that run skips
when there is no server). ``raw_sql`` tampers through the same back end as the log.

A test that is inherently about SQLite (its file, WAL, file locks) takes ``@sqlite_only``;
``db_path`` (the SQLite file) refuses to serve a PostgreSQL run, so such a test cannot pass
there by looking at the wrong database.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

from appliance.audit import AuditLog

BACKENDS = ("sqlite", "postgresql")
Params = tuple[object, ...] | Mapping[str, object]

# Pins a test to SQLite (direct parametrization overrides the ``audit_backend`` fixture below).
sqlite_only = pytest.mark.parametrize("audit_backend", ["sqlite"])


@pytest.fixture(params=BACKENDS)
def audit_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_path(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """The SQLite file of the log (only meaningful on the SQLite back end)."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if params.get("audit_backend", "sqlite") != "sqlite":
        pytest.fail(f"{request.node.nodeid}: db_path is the SQLite file, but this run is on "
                    f"{params['audit_backend']}: tamper with raw_sql(audit_log, ...) or mark the test @sqlite_only",
                    pytrace=False)
    return tmp_path / "audit.db"


@pytest.fixture
def audit_url(audit_backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The log's database URL on this run's back end (a fresh, empty database)."""
    if audit_backend == "sqlite":
        return f"sqlite:///{tmp_path / 'audit.db'}"
    return str(request.getfixturevalue("postgres_db_url"))


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    return tmp_path / "secrets" / "audit-signing.key"


@pytest.fixture
def audit_log(audit_url: str, key_path: Path) -> Iterator[AuditLog]:
    log = AuditLog(audit_url, key_path, checkpoint_every=None)
    yield log
    log.close()


def fill(log: AuditLog, stream: str, n: int, *, event_type: str = "completed") -> None:
    for i in range(n):
        log.append(event_type, stream=stream, actor="key:k1", request_id=f"{stream}-{i + 1}",
                   data={"model": "smollm2", "prompt_tokens": i, "completion_tokens": 2 * i, "n": i + 1})


def log_url(log: AuditLog) -> str:
    """The log's URL in full (``str(engine.url)`` masks a password)."""
    return log.engine.url.render_as_string(hide_password=False)


def raw_sql(target: AuditLog | str, sql: str, params: Params = ()) -> int:
    """Tamper with the database behind the log's back, as an attacker with database access would:
    its own connection, outside the log's code, committed at once. ``target``: the log or its URL.
    ``params``: a tuple for ``?`` placeholders or a mapping for ``:name`` ones. Returns rows touched."""
    statement, bound = _bind(sql, params)
    with _own_engine(target) as engine, engine.begin() as conn:
        return conn.execute(statement, bound).rowcount


def sql_rows(target: AuditLog | str, sql: str, params: Params = ()) -> list[tuple[object, ...]]:
    """Read the database directly, on its own connection (same ``params`` rules as ``raw_sql``)."""
    statement, bound = _bind(sql, params)
    with _own_engine(target) as engine, engine.connect() as conn:
        return [tuple(row) for row in conn.execute(statement, bound)]


@contextmanager
def _own_engine(target: AuditLog | str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(log_url(target) if isinstance(target, AuditLog) else target, poolclass=sa.pool.NullPool)
    try:
        yield engine
    finally:
        engine.dispose()


def _bind(sql: str, params: Params) -> tuple[sa.TextClause, dict[str, object]]:
    if isinstance(params, tuple):
        pieces = sql.split("?")
        if len(pieces) - 1 != len(params):
            raise ValueError(f"raw_sql: expected {len(pieces) - 1} parameters for the '?' in {sql!r}, "
                             f"found {len(params)}")
        sql = "".join(p + (f":p{i}" if i < len(params) else "") for i, p in enumerate(pieces))
        return sa.text(sql), {f"p{i}": v for i, v in enumerate(params)}
    return sa.text(sql), dict(params)
