"""A PostgreSQL server restart under a running gateway: the next use reconnects instead of failing.

``pg_ctl restart -m fast`` cuts every session, so each pooled connection of the gateway's engines
is dead afterwards; the stores (``open_database``) and the audit log (its own engine) check a
pooled connection before handing it out and replace a dead one. A cluster of its own
(tests/pg.py), since the shared one must not be restarted under other tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from appliance.audit import AuditLog
from appliance.db import open_database
from appliance.tenancy import TenantStore
from tests.pg import PostgresUnavailable, ThrowawayCluster


@pytest.fixture
def own_server() -> Iterator[tuple[ThrowawayCluster, str]]:
    try:
        cluster = ThrowawayCluster()
    except PostgresUnavailable as exc:
        pytest.skip(f"no PostgreSQL cluster of our own to restart: {exc}")
    try:
        yield cluster, cluster.start()
    except PostgresUnavailable as exc:
        pytest.skip(f"no PostgreSQL cluster of our own to restart: {exc}")
    finally:
        cluster.stop()


def _backend_pid(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())


def test_stores_and_audit_log_survive_a_server_restart(own_server: tuple[ThrowawayCluster, str],
                                                        tmp_path: Path) -> None:
    cluster, url = own_server
    engine = open_database(url)
    log = AuditLog(url, tmp_path / "audit.key", checkpoint_every=None)
    try:
        store = TenantStore(engine)
        store.create_tenant("acme")
        log.append("completed", stream="acme", actor="key:k1", data={"n": 1})
        before = _backend_pid(engine)  # the pooled connection that the restart will cut

        cluster.restart()

        store.create_tenant("globex")  # on a dead pooled connection this raised OperationalError
        assert _backend_pid(engine) != before, "the restart did not replace the session"
        assert [t.name for t in store.list_tenants()] == ["acme", "globex"]
        log.append("completed", stream="acme", actor="key:k1", data={"n": 2})
        assert [r.seq for r in log.query("acme")] == [1, 2]
        report = log.verify()
        assert report.ok, report.to_dict()
    finally:
        log.close()
        engine.dispose()


def test_without_the_pre_ping_a_restart_breaks_the_next_use(own_server: tuple[ThrowawayCluster, str]) -> None:
    """The control: the same restart under a plain engine does break its next use, so the test above
    shows the pre-ping at work rather than a restart that cut nothing."""
    cluster, url = own_server
    plain = sa.create_engine(url)
    try:
        _backend_pid(plain)
        cluster.restart()
        with pytest.raises(sa.exc.OperationalError):
            _backend_pid(plain)
    finally:
        plain.dispose()
