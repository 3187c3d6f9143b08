"""The appliance's database connection: SQLite by default, PostgreSQL for several gateways.

``open_database`` takes any SQLAlchemy URL; ``sqlite:///path`` (the embedded default) and
``postgresql+psycopg://user@host:port/db`` (psycopg 3; libpq's ``sslmode``/``sslrootcert``/
``sslcert``/``sslkey`` query parameters for TLS) are the two that are tested. On PostgreSQL
and on SQLite the appliance's tables are created here so that gateways starting together on a
new database do not race to CREATE TABLE (all but one used to fail).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa

# pg_advisory_lock key held while an opener creates the appliance's tables (the audit log's
# tables have their own, in appliance/audit/schema.py).
SCHEMA_LOCK_KEY = 0x50A7_A0CF
BACKENDS = ("sqlite", "postgresql")


def enable_wal(cursor: Any, *, timeout_s: float = 10.0) -> None:
    """``PRAGMA journal_mode=WAL`` on a DB-API SQLite cursor. Switching a new file to WAL needs its
    exclusive lock, and SQLite can answer "database is locked" at once, without its busy handler,
    while another process opening the same new file does the same: retried until ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


def open_database(url: str) -> sa.Engine:
    try:
        backend = sa.engine.make_url(url).get_backend_name()
    except (sa.exc.ArgumentError, ValueError) as exc:  # ValueError: a port that is no number
        raise ValueError(f"database url: expected sqlite:///PATH or postgresql+psycopg://USER@HOST:PORT/DB, "
                         f"found {_masked(url)!r}") from exc
    if backend not in BACKENDS:
        raise ValueError(f"database url: expected a sqlite or postgresql URL, found {backend}://")
    if backend == "sqlite":
        engine = sa.create_engine(url, future=True)

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout=10000")
            enable_wal(cur)
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
    else:
        # pre-ping: a pooled connection cut by a server restart or failover is replaced, not handed out
        engine = sa.create_engine(url, future=True, pool_pre_ping=True)
    create_appliance_tables(engine)
    return engine


def create_appliance_tables(engine: sa.Engine, *, attempts: int = 5) -> None:
    """Create every table of the appliance's stores that is missing. Each store also does this for
    its own, but processes opening a new database at once would collide (both see no table, the
    second CREATE fails): on PostgreSQL they take turns under an advisory lock; on SQLite a
    collision is retried, and the retry finds the other's tables."""
    from appliance import admins, limit_ledger, nodes, tenancy, usage  # they import nothing from here

    for attempt in range(attempts):
        try:
            with schema_lock(engine):
                for metadata in (tenancy.metadata, admins.metadata, nodes.metadata, usage.metadata,
                                 limit_ledger.metadata):
                    metadata.create_all(engine)
            return
        except sa.exc.OperationalError as exc:
            if "already exists" not in str(exc.orig) or attempt == attempts - 1:
                raise


@contextmanager
def schema_lock(engine: sa.Engine, key: int = SCHEMA_LOCK_KEY) -> Iterator[None]:
    """On PostgreSQL, a session advisory lock for the duration (schema changes one process at a
    time, across hosts); nothing on SQLite (``create_appliance_tables`` retries there)."""
    if engine.dialect.name != "postgresql":
        yield
        return
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        conn.commit()
        try:
            yield
        finally:
            conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            conn.commit()


def _masked(url: str) -> str:
    """``url`` without a password (``user:secret@`` -> ``user:***@``) for error messages."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url[:200]
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}{':***' if ':' in creds else ''}@{host}"[:200]
