"""The Merkle trees in the database: node lookups for proofs, and loading a tree's right edge.

Leaves are not stored twice: leaf ``i`` of a stream's tree is its record with ``seq = i + 1``,
leaf ``i`` of the appliance-wide tree (``_all``) the record with ``gidx = i``; the leaf hash is
``SHA-256(0x00 || record hash)``. Subtrees of level 1 and up are rows of ``audit_tree_nodes``.
"""

from __future__ import annotations

from sqlalchemy import Connection, func, select

from appliance.audit.checkpoint import GLOBAL_TREE
from appliance.audit.errors import AuditIntegrityError
from appliance.audit.merkle import Frontier, record_leaf
from appliance.audit.schema import audit_events, audit_tree_nodes


class DbNodes:
    """A ``merkle.NodeSource`` over one tree in the database (within ``conn``'s transaction)."""

    def __init__(self, conn: Connection, tree: str) -> None:
        self.conn = conn
        self.tree = tree

    def node(self, level: int, index: int) -> bytes:
        if level == 0:
            ev = audit_events.c
            where = (ev.gidx == index) if self.tree == GLOBAL_TREE else (
                (ev.stream == self.tree) & (ev.seq == index + 1))
            value = self.conn.execute(select(ev.hash).where(where)).scalar()
            if value is None:
                raise AuditIntegrityError(index + 1, self.tree, f"leaf {index} of tree {self.tree!r}", "no record",
                                          check="tree")
            return record_leaf(value)
        n = audit_tree_nodes.c
        found = self.conn.execute(
            select(n.hash).where(n.tree == self.tree, n.level == level, n.idx == index)).scalar()
        if found is None:
            raise AuditIntegrityError(None, self.tree, f"stored subtree level {level} index {index}", "none",
                                      check="tree")
        return bytes(found)


def tree_size(conn: Connection, tree: str) -> int:
    ev = audit_events.c
    if tree == GLOBAL_TREE:
        top = conn.execute(select(func.max(ev.gidx))).scalar()
        return 0 if top is None else int(top) + 1
    top = conn.execute(select(func.max(ev.seq)).where(ev.stream == tree)).scalar()
    return 0 if top is None else int(top)


def load_frontier(conn: Connection, tree: str, size: int) -> Frontier:
    return Frontier.load(DbNodes(conn, tree), size)
