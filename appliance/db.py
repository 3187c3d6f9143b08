"""The appliance's database connection (SQLite by default; any SQLAlchemy URL)."""

from __future__ import annotations

import sqlalchemy as sa


def open_database(url: str) -> sa.Engine:
    engine = sa.create_engine(url, future=True)
    if url.startswith("sqlite"):
        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=10000")
            cur.close()
    return engine
