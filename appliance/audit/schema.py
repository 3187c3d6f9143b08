"""Storage layout (SQLAlchemy 2 Core) and the engine factory.

Portable by construction: the logic issues only Core statements, so the same code runs on
SQLite (the default, ``sqlite:///path``) and PostgreSQL. SQLite specifics live only in the
engine factory: WAL journal, ``synchronous=FULL`` (a commit is on disk before ``append``
returns), a busy timeout, and ``BEGIN IMMEDIATE`` for write transactions so that two writers
never both read the same stream head.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool

from appliance.db import enable_wal

# Execution option a connection carries when it will append; see ``make_engine``.
WRITE_OPTION = "audit_write"
# pg_advisory_lock key held while an opener creates or upgrades the tables (PostgreSQL).
SCHEMA_LOCK_KEY = 0x50A7_A0D0

metadata = MetaData()

_id_type = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements INTEGER keys only

audit_events = Table(
    "audit_events",
    metadata,
    Column("id", _id_type, primary_key=True, autoincrement=True),
    Column("stream", String(128), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("ts", String(32), nullable=False),  # RFC 3339 text: kept byte-exact, it is hashed
    Column("event_type", String(80), nullable=False),
    Column("actor", String(256), nullable=False),
    Column("tenant", String(256), nullable=True),
    Column("request_id", String(256), nullable=True),
    Column("data", Text, nullable=False),  # canonical JSON text
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    # Position in the appliance-wide Merkle tree ("_all"); NULL only in a log written before
    # the trees existed, until the writer adopts those records at its first append.
    Column("gidx", BigInteger, nullable=True),
    # When retention removed the record's body (``data`` then holds ``{}``): the hash, the chain
    # links and the tree leaf stay, so the log still verifies.
    Column("pruned_at", String(32), nullable=True),
    UniqueConstraint("stream", "seq", name="uq_audit_events_stream_seq"),
    Index("ix_audit_events_stream_ts", "stream", "ts"),
    Index("uq_audit_events_gidx", "gidx", unique=True),
)

# Complete aligned subtrees of every tree, from level 1 up (leaves are the events themselves):
# (tree, level, idx) is the hash of leaves [idx * 2**level, (idx + 1) * 2**level). Every root and
# proof is folded from these (see merkle.py).
audit_tree_nodes = Table(
    "audit_tree_nodes",
    metadata,
    Column("tree", String(128), primary_key=True),
    Column("level", Integer, primary_key=True, autoincrement=False),
    Column("idx", BigInteger, primary_key=True, autoincrement=False),
    Column("hash", LargeBinary(32), nullable=False),
)

# Signed checkpoints: one C2SP signed note per (tree, size), ``note`` holding its exact text.
audit_tree_checkpoints = Table(
    "audit_tree_checkpoints",
    metadata,
    Column("id", _id_type, primary_key=True, autoincrement=True),
    Column("tree", String(128), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("root", String(64), nullable=False),
    Column("ts", String(32), nullable=False),  # when it was signed (not itself signed)
    Column("key_id", String(64), nullable=False),
    Column("note", Text, nullable=False),
    Index("ix_audit_tree_checkpoints_tree_size", "tree", "size"),
)

# Witness cosignatures (C2SP tlog-cosignature lines) on a stored checkpoint.
audit_cosignatures = Table(
    "audit_cosignatures",
    metadata,
    Column("id", _id_type, primary_key=True, autoincrement=True),
    Column("tree", String(128), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("root", String(64), nullable=False),
    Column("witness", String(256), nullable=False),
    Column("line", Text, nullable=False),
    Column("ts", String(32), nullable=False),
    Index("ix_audit_cosignatures_tree_size", "tree", "size"),
)

# Version 1 checkpoints (signed JSON heads of the hash chains), kept and still checked in a log
# upgraded from version 1; nothing writes them any more.
audit_checkpoints = Table(
    "audit_checkpoints",
    metadata,
    Column("id", _id_type, primary_key=True, autoincrement=True),
    Column("stream", String(128), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
    Column("ts", String(32), nullable=False),
    Column("key_id", String(64), nullable=False),
    Column("signature", String(128), nullable=False),  # base64 Ed25519 signature
    Index("ix_audit_checkpoints_stream_seq", "stream", "seq"),
)


def make_engine(url: str, *, busy_timeout_s: float = 30.0, create: bool = True) -> Engine:
    """An engine for ``url`` with the audit log's durability settings.

    ``create``: make the tables (and the SQLite file) when absent; otherwise an absent SQLite
    file is an error, so a mistyped path is never "verified" as an empty log.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if not create and parsed.database not in (None, "", ":memory:") and not Path(parsed.database).is_file():
            raise FileNotFoundError(f"audit database: expected a SQLite file at {parsed.database}, found none")
        if parsed.database in (None, "", ":memory:"):
            # One shared connection, or every pooled connection would see its own empty database.
            engine = create_engine(
                url, poolclass=StaticPool, connect_args={"check_same_thread": False, "timeout": busy_timeout_s}
            )
        else:
            engine = create_engine(url, connect_args={"timeout": busy_timeout_s})
        _configure_sqlite(engine, busy_timeout_s)
    else:
        # lock_timeout: like SQLite's busy timeout, a writer stuck behind another's lock fails
        # (closed, nothing recorded) after busy_timeout_s instead of waiting forever.
        engine = create_engine(url, pool_pre_ping=True,
                               connect_args={"options": f"-c lock_timeout={int(busy_timeout_s * 1000)}"})
        if create:
            _create_postgresql(engine)
            return engine
    if create and not set(metadata.tables) <= set(inspect(engine).get_table_names()):
        with engine.connect() as conn:
            # BEGIN IMMEDIATE (SQLite): the has-table reads and the CREATEs are one writer's, so
            # processes opening a new file together do not fail with "database is locked"
            conn.execution_options(**{WRITE_OPTION: True})
            with conn.begin():
                metadata.create_all(conn)
    if create:
        _upgrade_v1(engine)
    return engine


def _create_postgresql(engine: Engine) -> None:
    """Create and upgrade the tables one opener at a time: gateways starting together on a new
    database would otherwise race to CREATE TABLE (a duplicate type row, IntegrityError)."""
    with engine.connect() as lock_conn:
        lock_conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": SCHEMA_LOCK_KEY})
        try:
            metadata.create_all(engine)
            _upgrade_v1(engine)
        finally:
            lock_conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": SCHEMA_LOCK_KEY})
            lock_conn.commit()


def _upgrade_v1(engine: Engine) -> None:
    """Add the version 2 columns to an ``audit_events`` table created by version 1."""
    columns = {c["name"] for c in inspect(engine).get_columns("audit_events")}
    with engine.begin() as conn:
        for name in ("gidx", "pruned_at"):
            if name not in columns:
                kind = "BIGINT" if name == "gidx" else "VARCHAR(32)"
                conn.exec_driver_sql(f"ALTER TABLE audit_events ADD COLUMN {name} {kind}")
        if "gidx" not in columns:
            conn.exec_driver_sql("CREATE UNIQUE INDEX IF NOT EXISTS uq_audit_events_gidx ON audit_events (gidx)")


def _configure_sqlite(engine: Engine, busy_timeout_s: float) -> None:
    # pysqlite's own transaction handling delays BEGIN and cannot say IMMEDIATE; switch it off
    # and emit BEGIN ourselves (the recipe in SQLAlchemy's SQLite dialect documentation).
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            enable_wal(cursor, timeout_s=busy_timeout_s)
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        immediate = conn.get_execution_options().get(WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
