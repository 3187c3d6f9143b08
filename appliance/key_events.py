"""Key changes seen at once by every gateway process on one database: the key cache's epoch.

Each gateway process caches valid key checks (``apikeys.KeyCache``) so that a busy key costs no
database round trip per request. A revocation, a tenant's suspension or deletion, an admin's
disabling or a change of a key's expiry or scopes made by *another* process (another worker,
another gateway host, the ``appliance`` CLI) must end that key's use in this process at once,
not after the cache's TTL. Every cache entry carries the **epoch** read before its database
lookup, and is used only while the epoch is unchanged; ``current()`` gives ``None`` when the
epoch cannot be known right now, and the cache is then bypassed (every request looks its key up).

The change itself is noticed by the database, not by the code that makes it, so nothing that
writes those tables can forget to announce it: :func:`install_triggers` puts triggers on
``api_keys``, ``admin_keys``, ``tenants`` and ``admins`` (the columns of ``WATCHED``; the minutely
``last_used_at`` write is not one of them), so the announcement is part of the very transaction
that makes the change:

- **PostgreSQL**: the trigger calls ``pg_notify('sovereign_key_events', <table>)``, delivered to
  listeners when (and only if) the transaction commits. :class:`PostgresKeyListener` holds one
  connection per process that ``LISTEN``\\s on a thread of its own; each notification bumps the
  epoch. While that connection is down (server restart, network), while a notification has
  arrived on its socket but is not yet counted, and until it is connected, ``current()`` is
  ``None``. A heartbeat (``SELECT 1`` every ``heartbeat_s``) notices a connection that died silently.
- **SQLite** (one host; every worker opens the same file): the trigger bumps the one row of
  ``key_epoch``. :class:`SqliteKeyEpoch` reads it per request from a connection of its own with
  ``busy_timeout = 0``: a read of one row of a WAL database that never waits (``SQLITE_BUSY``, rare,
  gives ``None``), a few microseconds, so it runs on the event loop without blocking it.
"""

from __future__ import annotations

import contextlib
import logging
import select
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Protocol

import sqlalchemy as sa

from appliance.db import schema_lock

log = logging.getLogger(__name__)

CHANNEL = "sovereign_key_events"
# table -> the columns whose change can refuse a key that was accepted, or change what it opens
WATCHED: dict[str, tuple[str, ...]] = {
    "api_keys": ("revoked_at", "expires_at", "scopes", "secret_sha256", "tenant"),
    "admin_keys": ("revoked_at", "expires_at", "scopes", "secret_sha256", "admin"),
    "tenants": ("disabled", "models", "deleted_at"),
    "admins": ("disabled",),
}
PG_FUNCTION = "sovereign_key_event"


class KeyEvents(Protocol):
    def current(self) -> int | None: ...

    def close(self) -> None: ...


def install_triggers(engine: sa.Engine) -> None:
    """Create (or, on PostgreSQL, replace) the triggers that announce key changes; idempotent and
    safe while other processes do the same. The watched tables must exist (``open_database``)."""
    if engine.dialect.name == "postgresql":
        _install_postgres(engine)
    elif engine.dialect.name == "sqlite":
        _install_sqlite(engine)
    else:  # pragma: no cover - open_database accepts only these two
        raise ValueError(f"key events: expected a sqlite or postgresql database, found {engine.dialect.name}")


def _install_sqlite(engine: sa.Engine) -> None:
    bump = "BEGIN UPDATE key_epoch SET epoch = epoch + 1 WHERE id = 0; END"
    statements = [
        "CREATE TABLE IF NOT EXISTS key_epoch (id INTEGER PRIMARY KEY CHECK (id = 0), epoch INTEGER NOT NULL)",
        "INSERT OR IGNORE INTO key_epoch (id, epoch) VALUES (0, 0)",
    ]
    for table, columns in WATCHED.items():
        statements.append(f"CREATE TRIGGER IF NOT EXISTS key_epoch_{table}_update AFTER UPDATE OF "
                          f"{', '.join(columns)} ON {table} {bump}")
        statements.append(f"CREATE TRIGGER IF NOT EXISTS key_epoch_{table}_delete AFTER DELETE ON {table} {bump}")
    with engine.begin() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)


def _install_postgres(engine: sa.Engine) -> None:
    function = (f"CREATE OR REPLACE FUNCTION {PG_FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$ "
                f"BEGIN PERFORM pg_notify('{CHANNEL}', TG_TABLE_NAME); RETURN NULL; END $$")
    with schema_lock(engine), engine.begin() as conn:  # CREATE OR REPLACE collides when run concurrently
        conn.exec_driver_sql(function)
        present = set(conn.exec_driver_sql("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal").scalars())
        for table, columns in WATCHED.items():
            # (re)creating one locks its table against writes; other columns in WATCHED need a new name
            if f"key_event_{table}" in present:
                continue
            conn.exec_driver_sql(
                f"CREATE OR REPLACE TRIGGER key_event_{table} AFTER UPDATE OF {', '.join(columns)} OR DELETE "
                f"ON {table} FOR EACH STATEMENT EXECUTE FUNCTION {PG_FUNCTION}()")


class SqliteKeyEpoch:
    """The ``key_epoch`` row, read per request from a connection held by this process."""

    def __init__(self, path: str) -> None:
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA busy_timeout = 0")  # never wait on the event loop: BUSY gives None
        self._lock = threading.Lock()

    def current(self) -> int | None:
        try:
            with self._lock:
                rows = self._conn.execute("SELECT epoch FROM key_epoch WHERE id = 0").fetchall()
        except sqlite3.Error:
            return None
        return int(rows[0][0]) if rows else None

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _readable(fd: int, timeout_s: float) -> bool | None:
    """Whether ``fd`` has bytes to read within ``timeout_s`` (poll: no limit on the fd's number);
    None when it cannot be asked (closed)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    try:
        events = poller.poll(timeout_s * 1000)
    except (OSError, ValueError):
        return None
    if any(mask & (select.POLLNVAL | select.POLLERR) for _, mask in events):
        return None
    return bool(events)


class PostgresKeyListener:
    """``LISTEN sovereign_key_events`` on a connection and a thread of its own (see module doc)."""

    def __init__(self, connect: Callable[[], object], *, heartbeat_s: float = 5.0, retry_s: float = 1.0) -> None:
        self._connect = connect
        self.heartbeat_s = heartbeat_s
        self.retry_s = retry_s
        self._lock = threading.Lock()
        self._epoch = 0
        self._fd: int | None = None  # the listening socket while connected and caught up
        self._busy = False  # a notification is being read: not counted yet
        self._stop = threading.Event()
        self._connected = threading.Event()
        self.notifications = 0
        self._thread = threading.Thread(target=self._run, name="key-events", daemon=True)

    @classmethod
    def for_engine(cls, engine: sa.Engine, **kwargs: float) -> PostgresKeyListener:
        cargs, cparams = engine.dialect.create_connect_args(engine.url)
        return cls(lambda: engine.dialect.connect(*cargs, **cparams), **kwargs)

    def start(self, wait_s: float = 5.0) -> PostgresKeyListener:
        self._thread.start()
        self._connected.wait(wait_s)  # until then current() is None: the cache is bypassed, nothing is wrong
        return self

    def current(self) -> int | None:
        with self._lock:
            fd, busy, epoch = self._fd, self._busy, self._epoch
        if fd is None or busy:
            return None
        return None if _readable(fd, 0) is not False else epoch  # unread bytes may be a notification


    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _bump(self, _notify: object = None) -> None:
        with self._lock:
            self._epoch += 1
            self.notifications += 1

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            conn = None
            try:
                conn = self._connect()
                conn.autocommit = True  # type: ignore[attr-defined]
                conn.add_notify_handler(self._bump)  # type: ignore[attr-defined]  # those read by a heartbeat
                conn.execute(f"LISTEN {CHANNEL}")  # type: ignore[attr-defined]
                with self._lock:  # entries cached before this connection listened may be stale
                    self._epoch += 1
                    self._fd = conn.pgconn.socket  # type: ignore[attr-defined]
                self._connected.set()
                if failures:
                    log.warning("key events: listening again; cached keys are used again")
                failures = 0
                self._listen(conn)
            except Exception as exc:  # any failure means: not listening, bypass the cache
                with self._lock:
                    self._fd, self._busy = None, False
                if failures == 0:
                    log.warning("key events: not listening to the database (%s); every request looks its key "
                                "up until it is back", type(exc).__name__)
                failures += 1
                self._stop.wait(min(self.retry_s * failures, 10.0))
            finally:
                with self._lock:
                    self._fd, self._busy = None, False
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()  # type: ignore[attr-defined]

    def _listen(self, conn: object) -> None:
        pgconn = conn.pgconn  # type: ignore[attr-defined]
        beat = time.monotonic()
        while not self._stop.is_set():
            readable = _readable(pgconn.socket, min(1.0, self.heartbeat_s))
            if readable is None:
                raise ConnectionError("listener socket closed")
            if readable:
                with self._lock:
                    self._busy = True
                pgconn.consume_input()  # raises when the server has gone
                seen = 0
                while pgconn.notifies() is not None:
                    seen += 1
                with self._lock:
                    if seen:
                        self._epoch += 1
                        self.notifications += seen
                    self._busy = False
                if pgconn.status != 0:  # CONNECTION_OK
                    raise ConnectionError("listener connection lost")
            if time.monotonic() - beat >= self.heartbeat_s:
                conn.execute("SELECT 1")  # type: ignore[attr-defined]
                beat = time.monotonic()


def attach(engine: sa.Engine, cache: object) -> KeyEvents:
    """Install the triggers, start this process's watcher and make ``cache`` (a ``KeyCache``)
    consult it. Returns the watcher; ``close()`` it when the process stops serving."""
    install_triggers(engine)
    events: KeyEvents
    if engine.dialect.name == "postgresql":
        events = PostgresKeyListener.for_engine(engine).start()
    else:
        database = engine.url.database
        if not database or database == ":memory:":
            raise ValueError("key events: expected a SQLite database file, found an in-memory database")
        events = SqliteKeyEpoch(database)
    cache.events = events  # type: ignore[attr-defined]
    return events
