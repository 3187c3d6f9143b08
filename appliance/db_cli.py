"""``appliance db migrate`` and ``appliance db check``: the schema of the appliance's database.

The database is the one ``ROOT/current/appliance.yaml`` names (``database.url``; without it the
SQLite file ``ROOT/data/appliance.db``). Its tables are those of the appliance's stores (tenants,
keys, admins, nodes, usage: appliance/db.py ``create_appliance_tables``) and of the audit log
(appliance/audit/schema.py, which also upgrades a version 1 log's ``audit_events``).

``migrate`` creates what is missing and upgrades what is old, under the stores' PostgreSQL
advisory locks (several hosts may run it at once), then reports what it did and the schema state.
The installer runs it on the first gateway node before any gateway starts, on install and upgrade.
``check`` changes nothing: it connects (TLS verified as the URL says), reads the server version
and the tables and columns present, and says what ``migrate`` would add.

Exit codes: 0 done (check: schema current), 1 check only: reachable but tables or columns
missing (run migrate), 2 refused: no installed release, an invalid configuration, or the
database cannot be reached (its TLS verification or authentication failed included). No message
holds a password: URLs are shown as ``user@host:port/db``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import sqlalchemy as sa
import typer
from rich.console import Console

from appliance.errors import ApplianceError

db_app = typer.Typer(help="The appliance's database: create or upgrade its tables, check it.", no_args_is_help=True)
console = Console()
err = Console(stderr=True, soft_wrap=True)

RootOpt = Annotated[Path, typer.Option("--root", help="Install root of the appliance (a gateway node's).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")]
EXIT_SCHEMA_MISSING, EXIT_REFUSED = 1, 2


class DatabaseUnreachable(ApplianceError):
    """The configured database could not be reached, or refused the connection (TLS, authentication)."""


@dataclass
class SchemaState:
    """What the database holds of the appliance's schema."""

    database: str  # user@host:port/db (sslmode=...) or the SQLite path: never a password
    backend: str
    server_version: str = ""
    missing_tables: list[str] = field(default_factory=list)
    missing_columns: dict[str, list[str]] = field(default_factory=dict)
    tables: int = 0  # the appliance's tables present

    @property
    def state(self) -> str:
        if not self.missing_tables and not self.missing_columns:
            return "current"
        return "empty" if self.tables == 0 else "outdated"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "state": self.state}


def expected_tables() -> dict[str, sa.Table]:
    """Every table of the appliance's schema, by name."""
    from appliance import admins, nodes, tenancy, usage
    from appliance.audit import schema

    tables: dict[str, sa.Table] = {}
    for metadata in (tenancy.metadata, admins.metadata, nodes.metadata, usage.metadata, schema.metadata):
        tables.update(metadata.tables)
    return tables


def describe_url(url: str) -> str:
    """``url`` for messages: backend, user, host, port, database and sslmode; nothing else."""
    try:
        parsed = sa.engine.make_url(url)
    except (sa.exc.ArgumentError, ValueError):
        return "an unparsable database URL"
    if parsed.get_backend_name() == "sqlite":
        return f"SQLite {parsed.database}"
    where = f"{parsed.username or ''}@{parsed.host or 'localhost'}:{parsed.port or 5432}/{parsed.database or ''}"
    mode = parsed.query.get("sslmode")
    return f"PostgreSQL {where}" + (f" (sslmode={mode})" if mode else "")


def _reason(exc: BaseException) -> str:
    """The driver's own words (libpq's first lines), without SQLAlchemy's statement and links."""
    orig = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(orig).splitlines() if line.strip()]
    return "; ".join(lines[:3])[:600] or type(orig).__name__


def connect(url: str) -> sa.Engine:
    """An engine on ``url`` that has answered once; DatabaseUnreachable says why not."""
    described = describe_url(url)
    try:
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    except (sa.exc.ArgumentError, ValueError, ImportError) as exc:
        raise DatabaseUnreachable(f"database.url: expected sqlite:///PATH or postgresql+psycopg://USER@HOST:PORT/DB, "
                                  f"found {described} ({type(exc).__name__})") from None
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.DBAPIError as exc:
        engine.dispose()
        reason = _reason(exc)
        hint = ""
        if "certificate" in reason or "SSL" in reason or "host name" in reason:
            hint = (" (TLS: the server's certificate must chain to the CA in sslrootcert, the installer's "
                    "ROOT/tls/database/ca.pem, and name the host of the URL)")
        raise DatabaseUnreachable(f"database {described}: expected a connection, found {reason}{hint}") from None
    return engine


def inspect_schema(engine: sa.Engine, url: str) -> SchemaState:
    state = SchemaState(database=describe_url(url), backend=engine.dialect.name)
    info = engine.dialect.server_version_info
    state.server_version = ".".join(str(p) for p in info) if info else ""
    inspector = sa.inspect(engine)
    present = set(inspector.get_table_names())
    for name, table in sorted(expected_tables().items()):
        if name not in present:
            state.missing_tables.append(name)
            continue
        state.tables += 1
        have = {c["name"] for c in inspector.get_columns(name)}
        missing = [c.name for c in table.columns if c.name not in have]
        if missing:
            state.missing_columns[name] = missing
    return state


def check(url: str) -> SchemaState:
    """The schema state of the database at ``url``; changes nothing (an absent SQLite file is
    reported as empty, not created)."""
    try:
        parsed = sa.engine.make_url(url)
    except (sa.exc.ArgumentError, ValueError):
        raise DatabaseUnreachable(f"database.url: expected sqlite:///PATH or postgresql+psycopg://USER@HOST:PORT/DB, "
                                  f"found {describe_url(url)}") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database and not Path(parsed.database).is_file():
        return SchemaState(database=describe_url(url), backend="sqlite", missing_tables=sorted(expected_tables()))
    engine = connect(url)
    try:
        return inspect_schema(engine, url)
    finally:
        engine.dispose()


def migrate(url: str) -> tuple[SchemaState, SchemaState, float]:
    """Create and upgrade the appliance's tables at ``url``: (state before, state after, seconds)."""
    from appliance.audit.schema import make_engine
    from appliance.db import open_database

    before = check(url)
    started = time.monotonic()
    try:
        open_database(url).dispose()  # the stores' tables, under their advisory lock
        make_engine(url, create=True).dispose()  # the audit log's tables and their upgrade
    except sa.exc.DBAPIError as exc:
        raise DatabaseUnreachable(f"database {describe_url(url)}: expected to create the appliance's tables, "
                                  f"found {_reason(exc)}") from None
    seconds = time.monotonic() - started
    return before, check(url), seconds


def _database_url(root: Path) -> str:
    from appliance.config import load_config

    return load_config(root).db_url


def _fail(exc: Exception, code: int = EXIT_REFUSED) -> typer.Exit:
    err.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
    return typer.Exit(code)


def _show(state: SchemaState) -> None:
    version = f" {state.server_version}" if state.server_version else ""
    console.print(f"database: {state.database} ({state.backend}{version})", highlight=False)
    console.print(f"schema: {state.state}: {state.tables} of {len(expected_tables())} tables", highlight=False)
    if state.missing_tables:
        console.print(f"missing tables: {', '.join(state.missing_tables)}", highlight=False)
    for table, columns in sorted(state.missing_columns.items()):
        console.print(f"missing columns of {table}: {', '.join(columns)}", highlight=False)


@db_app.command("migrate")
def migrate_command(root: RootOpt = Path("var"), as_json: JsonOpt = False) -> None:
    """Create or upgrade the appliance's and the audit log's tables in the configured database."""
    try:
        url = _database_url(root)
        before, after, seconds = migrate(url)
    except ApplianceError as exc:
        raise _fail(exc) from None
    created = [t for t in before.missing_tables if t not in after.missing_tables]
    added = {t: [c for c in cols if c not in after.missing_columns.get(t, [])]
             for t, cols in before.missing_columns.items()}
    added = {t: cols for t, cols in added.items() if cols}
    changed = bool(created or added)
    if as_json:
        print(json.dumps({"ok": after.state == "current", "changed": changed, "created_tables": created,
                          "added_columns": added, "seconds": round(seconds, 3), "schema": after.to_dict()}))
    else:
        if changed:
            console.print(f"created {len(created)} tables" + (f": {', '.join(created)}" if created else "")
                          + (f"; added columns: {added}" if added else ""), highlight=False)
        else:
            console.print("nothing to do: every table and column was already there", highlight=False)
        _show(after)
    if after.state != "current":
        raise typer.Exit(EXIT_SCHEMA_MISSING)


@db_app.command("check")
def check_command(root: RootOpt = Path("var"), as_json: JsonOpt = False) -> None:
    """Whether the configured database answers, and which of the appliance's tables it holds;
    changes nothing. Exit 1: reachable, schema incomplete (run `appliance db migrate`)."""
    try:
        state = check(_database_url(root))
    except ApplianceError as exc:
        if as_json:
            print(json.dumps({"ok": False, "reachable": False, "message": str(exc)}))
        raise _fail(exc) from None
    if as_json:
        print(json.dumps({"ok": state.state == "current", "reachable": True, "schema": state.to_dict()}))
    else:
        _show(state)
    if state.state != "current":
        raise typer.Exit(EXIT_SCHEMA_MISSING)
