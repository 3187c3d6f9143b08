"""``appliance db migrate`` and ``appliance db check`` (the real CLI in a child process) on a real
PostgreSQL: the server CI started (tests/pg.py, a fresh database per test), and for TLS with
verify-full and password authentication a throwaway cluster of this module's own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from appliance.db_cli import expected_tables
from appliance.tls import TlsFiles, ensure_tls
from tests.pg import PostgresUnavailable, ThrowawayCluster, fresh_database, postgres_server

PASSWORD = "Pw-of:the\\app-4711"  # ':' and '\\' are escaped in a libpq password file


@pytest.fixture(scope="module")
def pg_admin() -> Iterator[str]:
    try:
        with postgres_server() as url:
            yield url
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture
def pg_url(pg_admin: str) -> Iterator[str]:
    with fresh_database(pg_admin, "dbcli") as url:
        yield url


def install_root(root: Path, url: str) -> Path:
    """The least appliance.yaml that load_config takes, naming ``url`` as database.url."""
    (root / "current").mkdir(parents=True)
    (root / "current" / "appliance.yaml").write_text(yaml.safe_dump({
        "version": "0.1.0", "model": {"name": "m", "path": str(root / "model")},
        "policies_dir": str(root / "policies"), "database": {"url": url}}))
    return root


def db(root: Path, action: str, *extra: str) -> tuple[int, dict[str, Any], str]:
    proc = subprocess.run([sys.executable, "-c", "from appliance.cli import main; main()", "db", action,
                           "--root", str(root), "--json", *extra], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})
    lines = proc.stdout.strip().splitlines()
    return proc.returncode, (json.loads(lines[-1]) if lines else {}), proc.stderr


def test_migrate_creates_every_table_once_and_check_changes_nothing(pg_url: str, tmp_path: Path) -> None:
    root = install_root(tmp_path / "root", pg_url)
    rc, report, _ = db(root, "check")
    assert rc == 1 and report["reachable"] is True and report["schema"]["state"] == "empty", report
    assert sorted(report["schema"]["missing_tables"]) == sorted(expected_tables())
    assert report["schema"]["server_version"].split(".")[0].isdigit()
    engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    try:
        assert sa.inspect(engine).get_table_names() == []  # check created nothing
        rc, report, err = db(root, "migrate")
        assert rc == 0, err
        assert report["changed"] is True and sorted(report["created_tables"]) == sorted(expected_tables())
        assert report["schema"]["state"] == "current"
        assert report["schema"]["database"].startswith("PostgreSQL postgres@127.0.0.1:")
        assert set(expected_tables()) <= set(sa.inspect(engine).get_table_names())
        rc, again, _ = db(root, "migrate")
        assert rc == 0 and again["changed"] is False and again["created_tables"] == []
        # a version 1 audit log lacks two columns: check says so, migrate adds them
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE audit_events DROP COLUMN pruned_at")
        rc, report, _ = db(root, "check")
        assert rc == 1 and report["schema"]["state"] == "outdated"
        assert report["schema"]["missing_columns"] == {"audit_events": ["pruned_at"]}
        rc, report, _ = db(root, "migrate")
        assert rc == 0 and report["added_columns"] == {"audit_events": ["pruned_at"]}
        assert db(root, "check")[0] == 0
    finally:
        engine.dispose()


def test_an_unreachable_database_is_a_clear_error_without_its_password(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = install_root(tmp_path / "root", f"postgresql+psycopg://app:{PASSWORD}@127.0.0.1:{port}/appdb")
    for action in ("check", "migrate"):
        rc, report, err = db(root, action)
        assert rc == 2, (action, report, err)
        assert "database PostgreSQL app@127.0.0.1:" in err and "expected a connection, found" in err, err
        assert "Connection refused" in err or "connection refused" in err.lower(), err
        assert PASSWORD not in err + json.dumps(report) and "Pw-of" not in err


def test_without_an_installed_release_db_refuses(tmp_path: Path) -> None:
    rc, _, err = db(tmp_path / "nothing", "check")
    assert rc == 2 and "no installed release" in err


@pytest.fixture(scope="module")
def tls_scram_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, TlsFiles]]:
    """A cluster with TLS whose role ``app`` must log in over TLS with its password (scram-sha-256):
    (the URL of app without TLS parameters, the CA and certificate the server presents)."""
    files = ensure_tls(tmp_path_factory.mktemp("pg-tls"), ["127.0.0.1", "localhost"])
    try:
        cluster = ThrowawayCluster(tls=(files.cert, files.key))
        admin = cluster.start()
    except PostgresUnavailable as exc:
        pytest.skip(f"no PostgreSQL cluster of our own for the TLS test: {exc}")
    try:
        engine = sa.create_engine(admin, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
        with engine.connect() as conn:
            quoted = PASSWORD.replace("'", "''")
            conn.exec_driver_sql(f"CREATE ROLE app LOGIN PASSWORD '{quoted}'")
            conn.exec_driver_sql("CREATE DATABASE appdb OWNER app")
            hba = cluster.data / "pg_hba.conf"
            hba.write_text("local all all trust\nhost all postgres 127.0.0.1/32 trust\n"
                           "hostssl all app 127.0.0.1/32 scram-sha-256\n")
            assert conn.execute(sa.text("SELECT pg_reload_conf()")).scalar()
        engine.dispose()
        yield f"postgresql+psycopg://app@127.0.0.1:{cluster.port}/appdb", files
    finally:
        cluster.stop()


def passfile(path: Path, password: str) -> Path:
    from installer.database import pgpass_line  # the installer writes this file on each gateway node

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(pgpass_line("app", password))
    return path


def test_verify_full_with_a_password_file_migrates_and_a_stranger_ca_or_wrong_password_is_refused(
        tls_scram_server: tuple[str, TlsFiles], tmp_path: Path) -> None:
    base, files = tls_scram_server
    good = passfile(tmp_path / "good.pgpass", PASSWORD)
    root = install_root(tmp_path / "ok", f"{base}?sslmode=verify-full&sslrootcert={files.ca_cert}&passfile={good}")
    rc, report, err = db(root, "migrate")
    assert rc == 0, err
    assert report["schema"]["state"] == "current"
    assert report["schema"]["database"] == f"PostgreSQL app@127.0.0.1:{sa.engine.make_url(base).port}/appdb " \
                                           "(sslmode=verify-full)"

    stranger = ensure_tls(tmp_path / "other-ca", ["127.0.0.1"])
    root = install_root(tmp_path / "stranger",
                        f"{base}?sslmode=verify-full&sslrootcert={stranger.ca_cert}&passfile={good}")
    rc, _, err = db(root, "check")
    assert rc == 2 and "SSL error" in err and "TLS: the server's certificate must chain" in err, err

    wrong = passfile(tmp_path / "wrong.pgpass", "not-" + PASSWORD)
    root = install_root(tmp_path / "wrong", f"{base}?sslmode=verify-full&sslrootcert={files.ca_cert}&passfile={wrong}")
    rc, _, err = db(root, "check")
    assert rc == 2 and "password authentication failed" in err, err
    assert PASSWORD not in err and "Pw-of" not in err
