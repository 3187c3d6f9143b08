"""Key events (appliance/key_events.py) on a real SQLite file and a real PostgreSQL, with two
engines standing for two gateway processes: a change made through one outdates the other's cache
entries at once; a key's minutely last-use write does not; a PostgreSQL listener that lost its
connection makes the cache be bypassed until it listens again; the SQLite epoch read never waits
for a writer."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from appliance import key_events
from appliance.db import open_database
from appliance.tenancy import TenantStore


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'keys.db'}"
        return
    from tests.pg import fresh_database

    with fresh_database(request.getfixturevalue("postgres_url")) as url:
        yield url


def _until(check: Callable[[], bool], timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return check()


def _cached(store: TenantStore, key: str) -> bool:
    """What the gateway's auth middleware does: epoch first, then the cache, else a lookup kept."""
    cache = store.cache
    fp = cache.fingerprint(key)
    epoch = cache.epoch()
    if cache.get(fp, epoch) is not None:
        return True
    cache.put(fp, store.check(key), epoch)
    return False


def test_a_change_through_another_process_outdates_the_cache_at_once(db_url: str) -> None:
    here_db, there_db = open_database(db_url), open_database(db_url)
    here, there = TenantStore(here_db, cache_ttl_s=3600), TenantStore(there_db)
    events = key_events.attach(here_db, here.cache)
    try:
        there.create_tenant("acme")
        key = there.issue_key("acme")
        other = there.issue_key("acme")
        assert not _cached(here, key.secret) and _cached(here, key.secret)
        there.touch(key.key_id)  # the minutely last_used_at write changes nothing a check depends on
        time.sleep(0.2)
        assert _cached(here, key.secret)
        there.revoke_key(other.key_id)  # another key's revocation: entries are re-checked once
        assert _until(lambda: here.cache.get(here.cache.fingerprint(key.secret), here.cache.epoch()) is None)
        assert not _cached(here, key.secret) and _cached(here, key.secret)
        there.update_tenant("acme", disabled=True)
        assert _until(lambda: not _cached(here, key.secret))
        assert here.cache.get(here.cache.fingerprint(key.secret), here.cache.epoch()) is None  # refused: never kept
    finally:
        events.close()
        here_db.dispose()
        there_db.dispose()


def test_the_triggers_ride_in_the_changing_transaction(db_url: str) -> None:
    """A change rolled back announces nothing; installing twice (two processes) is harmless."""
    engine = open_database(db_url)
    store = TenantStore(engine, cache_ttl_s=3600)
    key_events.install_triggers(engine)
    events = key_events.attach(engine, store.cache)
    try:
        store.create_tenant("acme")
        key = store.issue_key("acme")
        assert not _cached(store, key.secret) and _cached(store, key.secret)
        with engine.connect() as conn, conn.begin() as tx:
            conn.execute(sa.text("UPDATE api_keys SET revoked_at = '2000-01-01T00:00:00+00:00'"))
            tx.rollback()
        time.sleep(0.3)
        assert _cached(store, key.secret)
    finally:
        events.close()
        engine.dispose()


def test_a_postgres_listener_that_lost_its_connection_bypasses_the_cache_until_it_listens_again(
        postgres_db_url: str) -> None:
    engine = open_database(postgres_db_url)
    store = TenantStore(engine, cache_ttl_s=3600)
    listener = key_events.PostgresKeyListener.for_engine(engine, heartbeat_s=0.5, retry_s=0.2).start()
    store.cache.events = listener
    try:
        store.create_tenant("acme")
        key = store.issue_key("acme")
        assert not _cached(store, key.secret) and _cached(store, key.secret)
        with engine.connect() as conn:  # the server ends the listener's session (as a restart would)
            conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                 "WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()"))
        assert _until(lambda: listener.current() is None, 5), "the lost connection was not noticed"
        assert _until(lambda: listener.current() is not None, 10), "the listener did not reconnect"
        assert not _cached(store, key.secret)  # entries from before the gap are not trusted
        assert _cached(store, key.secret)
    finally:
        listener.close()
        engine.dispose()


def test_the_sqlite_epoch_read_never_waits_for_a_writer(tmp_path: Path) -> None:
    import sqlite3

    url = f"sqlite:///{tmp_path / 'keys.db'}"
    engine = open_database(url)
    TenantStore(engine)
    key_events.install_triggers(engine)
    epoch = key_events.SqliteKeyEpoch(str(tmp_path / "keys.db"))
    writer = sqlite3.connect(tmp_path / "keys.db", isolation_level=None)
    try:
        before = epoch.current()
        assert before is not None
        writer.execute("BEGIN EXCLUSIVE")  # a writer holds the file (WAL: readers go on)
        writer.execute("UPDATE key_epoch SET epoch = epoch + 1")
        start = time.perf_counter()
        assert epoch.current() == before  # not yet committed: the old value, at once
        assert time.perf_counter() - start < 1.0  # busy_timeout 0: a wait would take the whole timeout
        writer.execute("COMMIT")
        assert epoch.current() == before + 1
    finally:
        writer.close()
        epoch.close()
        engine.dispose()
