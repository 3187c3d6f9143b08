"""A real PostgreSQL server for tests: the one CI started, or a throwaway cluster of our own.

``.ci/run`` starts a cluster and exports ``SOVEREIGN_TEST_POSTGRES_URL`` (a SQLAlchemy URL of a
superuser on a maintenance database). Without it, a developer's ``make test`` or single test run
starts a throwaway cluster the same way: Debian's ``initdb``/``pg_ctl`` (on PATH or under
``/usr/lib/postgresql/<version>/bin``), a data directory in a temp dir, listening on 127.0.0.1
on a free port and on a unix socket in that temp dir, trust authentication for local
connections only. As root the server runs as the ``postgres`` user (PostgreSQL refuses root).

Each test gets its own database (``fresh_database``), dropped afterwards.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import make_url

ENV_URL = "SOVEREIGN_TEST_POSTGRES_URL"
DRIVER = "postgresql+psycopg"
_SAFE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class PostgresUnavailable(RuntimeError):
    """No server given and none can be started here; the message says why."""


def normalized_url(url: str) -> str:
    """``url`` with the psycopg 3 driver named (``postgresql://`` alone would ask for psycopg2)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise ValueError(f"{ENV_URL}: expected a postgresql:// or {DRIVER}:// URL, found {parsed.drivername}://")
    return parsed.set(drivername=DRIVER).render_as_string(hide_password=False)


def pg_binary(name: str) -> str | None:
    """``initdb``/``pg_ctl``/...: on PATH, else Debian's newest ``/usr/lib/postgresql/N/bin``."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                      key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else -1, reverse=True)
    for bin_dir in versions:
        if os.access(bin_dir / name, os.X_OK):
            return str(bin_dir / name)
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ThrowawayCluster:
    """``initdb`` + ``pg_ctl start`` in a temp dir; ``stop()`` stops it and removes every file."""

    def __init__(self, tls: tuple[Path, Path] | None = None) -> None:
        """``tls``: (certificate, private key) PEM files: the server then also accepts TLS (ssl=on)."""
        self.tls = tls
        initdb, pg_ctl = pg_binary("initdb"), pg_binary("pg_ctl")
        if initdb is None or pg_ctl is None:
            raise PostgresUnavailable("no PostgreSQL server binaries (initdb, pg_ctl): install Debian's "
                                      f"`postgresql` package or set {ENV_URL} to a server's URL")
        self.initdb, self.pg_ctl = initdb, pg_ctl
        self.run_as: list[str] = []
        if os.geteuid() == 0:  # the server refuses to run as root
            if shutil.which("runuser") is None or _uid_of("postgres") is None:
                raise PostgresUnavailable("running as root without a `postgres` user (or runuser) to start "
                                          f"PostgreSQL as; set {ENV_URL} to a server's URL")
            self.run_as = ["runuser", "-u", "postgres", "--"]
        self.dir = Path(tempfile.mkdtemp(prefix="sovereign-pg-"))
        self.data = self.dir / "data"
        self.port = 0
        self.started = False

    def start(self) -> str:
        """Start the server; the URL of its superuser ``postgres`` on the ``postgres`` database."""
        if self.run_as:
            uid = _uid_of("postgres")
            assert uid is not None  # checked in __init__
            os.chown(self.dir, uid, -1)
        self._run([self.initdb, "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                   "--locale=C.UTF-8", "--no-instructions"], "initdb")
        ssl = ""
        if self.tls is not None:  # ssl_cert_file/ssl_key_file default to these names in the data dir
            for source, name in zip(self.tls, ("server.crt", "server.key"), strict=True):
                target = self.data / name
                shutil.copyfile(source, target)
                target.chmod(0o600)  # the server refuses a key others may read
                if self.run_as:
                    os.chown(target, _uid_of("postgres") or 0, -1)
            ssl = " -c ssl=on"
        # Only 127.0.0.1 and our own socket directory; initdb -A trust writes trust lines for local
        # sockets and loopback addresses only (pg_hba.conf), so nothing else may connect.
        for _attempt in range(5):
            self.port = _free_port()
            options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c max_connections=200{ssl}"
            started = subprocess.run(
                [*self.run_as, self.pg_ctl, "-D", str(self.data), "-l", str(self.dir / "server.log"),
                 "-o", options, "-w", "-t", "60", "start"], capture_output=True, text=True, timeout=90, cwd=self.dir)
            if started.returncode == 0:
                self.started = True
                return f"{DRIVER}://postgres@127.0.0.1:{self.port}/postgres"
        raise PostgresUnavailable(f"pg_ctl start failed: {self._log_tail()}")

    def restart(self) -> None:
        """Stop the server (``-m fast``: every session is cut) and start it again with the same options."""
        # -l: the server's output must not go to our pipe, which would then never close
        self._run([self.pg_ctl, "-D", str(self.data), "-l", str(self.dir / "server.log"), "-m", "fast", "-w",
                   "-t", "60", "restart"], "pg_ctl restart")

    def stop(self) -> None:
        try:
            if self.started:
                subprocess.run([*self.run_as, self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"],
                               capture_output=True, timeout=60, cwd=self.dir)
        finally:
            self.started = False
            shutil.rmtree(self.dir, ignore_errors=True)

    def _run(self, argv: list[str], what: str) -> None:
        # cwd: the server's user may not be allowed into the caller's directory.
        done = subprocess.run([*self.run_as, *argv], capture_output=True, text=True, timeout=120, cwd=self.dir)
        if done.returncode != 0:
            raise PostgresUnavailable(f"{what} failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")

    def _log_tail(self) -> str:
        try:
            return (self.dir / "server.log").read_text(errors="replace")[-800:]
        except OSError:
            return "no server log"


def _uid_of(user: str) -> int | None:
    import pwd

    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


@contextmanager
def postgres_server() -> Iterator[str]:
    """The server's admin URL: ``$SOVEREIGN_TEST_POSTGRES_URL``, else a throwaway cluster for the
    duration. ``PostgresUnavailable`` says why there is none."""
    given = os.environ.get(ENV_URL, "").strip()
    if given:
        yield normalized_url(given)
        return
    cluster = ThrowawayCluster()
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@contextmanager
def fresh_database(admin_url: str, prefix: str = "t") -> Iterator[str]:
    """A new, empty database on the server at ``admin_url``; dropped afterwards even if a test left
    connections open (``WITH (FORCE)``, PostgreSQL 13+)."""
    name = f"{prefix}_{uuid.uuid4().hex[:16]}"
    if not _SAFE_NAME.match(name):
        raise ValueError(f"database name: expected [a-z_][a-z0-9_]*, found {name!r}")
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        try:
            yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()
