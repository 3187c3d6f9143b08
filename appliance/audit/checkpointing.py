"""Reading checkpoints and stream names from the database (signing is the writer's job)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, select, union

from appliance.audit.checkpoint import Checkpoint
from appliance.audit.schema import audit_checkpoints, audit_events, audit_tree_checkpoints


def stream_names(conn: Connection, *, include_checkpointed: bool = False) -> list[str]:
    """Streams with records (and, if asked, streams that only checkpoints remember)."""
    stmt: Any = select(audit_events.c.stream).distinct()
    if include_checkpointed:
        cp = audit_tree_checkpoints.c
        stmt = union(select(audit_events.c.stream), select(cp.tree).where(cp.tree != "_all"),
                     select(audit_checkpoints.c.stream))
    return sorted(row[0] for row in conn.execute(stmt))


def load_checkpoints(conn: Connection, tree: str) -> list[Checkpoint]:
    cp = audit_tree_checkpoints.c
    rows = conn.execute(select(audit_tree_checkpoints).where(cp.tree == tree).order_by(cp.size, cp.id))
    return [Checkpoint.from_row(row) for row in rows]


def latest_checkpoint(conn: Connection, tree: str) -> Checkpoint | None:
    """The newest checkpoint of ``tree``."""
    cp = audit_tree_checkpoints.c
    stmt = select(audit_tree_checkpoints).where(cp.tree == tree)
    row = conn.execute(stmt.order_by(cp.size.desc(), cp.id.desc()).limit(1)).first()
    return None if row is None else Checkpoint.from_row(row)


def load_legacy_checkpoints(conn: Connection, stream: str) -> list[Any]:
    """Version 1 checkpoints of ``stream`` (signed JSON chain heads), oldest first."""
    cp = audit_checkpoints.c
    return list(conn.execute(select(audit_checkpoints).where(cp.stream == stream).order_by(cp.seq, cp.id)))
