"""TLS to PostgreSQL: the appliance's stores and audit log over a verify-full connection.

A throwaway cluster of its own (tests/pg.py) with a server certificate from the appliance's own
CA code (``appliance.tls.ensure_tls``), so this needs ``initdb`` here, not only
``SOVEREIGN_TEST_POSTGRES_URL``; it skips, saying why, where no cluster can be started.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from appliance.audit import AuditLog
from appliance.db import open_database
from appliance.tenancy import TenantStore
from appliance.tls import TlsFiles, ensure_tls
from tests.pg import PostgresUnavailable, ThrowawayCluster


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, TlsFiles]]:
    """(admin URL without TLS parameters, the CA and certificate the server presents)."""
    files = ensure_tls(tmp_path_factory.mktemp("pg-tls"), ["127.0.0.1", "localhost"])
    try:
        cluster = ThrowawayCluster(tls=(files.cert, files.key))
    except PostgresUnavailable as exc:
        pytest.skip(f"no PostgreSQL cluster of our own for the TLS test: {exc}")
    try:
        url = cluster.start()
    except PostgresUnavailable as exc:
        cluster.stop()
        pytest.skip(f"no PostgreSQL cluster of our own for the TLS test: {exc}")
    try:
        yield url, files
    finally:
        cluster.stop()


def _ssl_in_use(url: str) -> bool:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return bool(conn.execute(sa.text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")).scalar())
    finally:
        engine.dispose()


def test_stores_and_audit_log_over_verify_full(tls_server: tuple[str, TlsFiles], tmp_path: Path) -> None:
    base, files = tls_server
    url = f"{base}?sslmode=verify-full&sslrootcert={files.ca_cert}"
    assert _ssl_in_use(url)
    assert not _ssl_in_use(f"{base}?sslmode=disable")  # the check above can tell the two apart
    engine = open_database(url)
    try:
        store = TenantStore(engine)
        store.create_tenant("acme")
        assert store.check(store.issue_key("acme").secret).tenant == "acme"
    finally:
        engine.dispose()
    with AuditLog(url, tmp_path / "audit.key", checkpoint_every=None) as log:
        log.append("completed", stream="acme", actor="key:k1", data={"n": 1})
        assert log.checkpoint() and log.verify().ok


def test_a_server_certificate_from_another_ca_is_refused(tls_server: tuple[str, TlsFiles], tmp_path: Path) -> None:
    base, _ = tls_server
    stranger = ensure_tls(tmp_path / "other-ca", ["127.0.0.1"])
    with pytest.raises(sa.exc.OperationalError, match=r"SSL error|certificate verify failed"):
        open_database(f"{base}?sslmode=verify-full&sslrootcert={stranger.ca_cert}")


def test_verify_full_checks_the_host_name(tls_server: tuple[str, TlsFiles]) -> None:
    """The certificate names 127.0.0.1 and localhost: reached as another name (libpq's hostaddr keeps
    the address, so only the name differs), it is refused."""
    base, files = tls_server
    tls = f"sslmode=verify-full&sslrootcert={files.ca_cert}&hostaddr=127.0.0.1"

    def named(host: str) -> str:
        return f"{sa.engine.make_url(base).set(host=host).render_as_string(hide_password=False)}?{tls}"

    assert _ssl_in_use(named("localhost"))
    with pytest.raises(sa.exc.OperationalError, match="does not match host name"):
        open_database(named("db.elsewhere.example"))
