"""The node registry: every engine node the gateway may route to, in the database.

A node has a name, an ``https://`` URL (mutual TLS) or ``inprocess://<name>`` for the engine of a
single-node install, placement labels (``region``, ``site``, ``classification`` and free labels),
the model names it serves, a lifecycle ``state`` set by admins (``active``, ``draining``,
``drained``) and a ``health`` set by the gateway's probes (``up``, ``down``, ``unknown``). What
admins and tenants see as the node's state is ``down`` when an active node fails its probes.

Nodes come from the installer's inventory (``source = inventory``, synced at gateway start) and
from admins (``appliance nodes add``, the admin API; ``source = admin``). Every change returns a
description for the caller to audit; this module writes no audit records itself.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from appliance.errors import ApplianceError

metadata = sa.MetaData()

nodes_table = sa.Table(
    "nodes",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("url", sa.String(512), nullable=False),
    sa.Column("labels", sa.Text, nullable=False),  # JSON object of str -> str
    sa.Column("models", sa.Text, nullable=False),  # JSON list of str
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("health", sa.String(16), nullable=False),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("last_health_at", sa.String(40), nullable=True),
    sa.Column("last_error", sa.String(500), nullable=False, default=""),
    sa.Column("updated_at", sa.String(40), nullable=False),
)

STATES = ("active", "draining", "drained")
HEALTH = ("up", "down", "unknown")
NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")
INPROCESS = "inprocess://"


class NodeError(ApplianceError):
    """A node registry operation was refused (unknown node, bad name, URL or labels)."""


@dataclass(frozen=True)
class Node:
    name: str
    url: str
    labels: dict[str, str] = field(default_factory=dict)
    models: tuple[str, ...] = ()
    state: str = "active"
    health: str = "unknown"
    source: str = "admin"
    last_health_at: str | None = None
    last_error: str = ""

    @property
    def display_state(self) -> str:
        return "down" if self.state == "active" and self.health == "down" else self.state

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "url": self.url, "labels": dict(self.labels), "models": list(self.models),
                "state": self.display_state, "lifecycle": self.state, "health": self.health, "source": self.source,
                "last_health_at": self.last_health_at, "last_error": self.last_error}


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def validate_node(name: str, url: str, labels: dict[str, str], models: list[str] | tuple[str, ...]) -> None:
    if not NODE_NAME.match(name):
        raise NodeError(f"invalid node name {name!r}: expected 1-64 chars of A-Z a-z 0-9 . _ -, "
                        "starting with a letter or digit")
    if not (url.startswith("https://") or url == INPROCESS + name):
        raise NodeError(f"node {name}: url must be https://HOST:PORT (mutual TLS), found {url[:200]!r}")
    for key, value in labels.items():
        if not LABEL_KEY.match(key) or not isinstance(value, str) or not 0 < len(value) <= 128:
            raise NodeError(f"node {name}: label {key[:64]!r}={str(value)[:64]!r}: expected a key of "
                            "A-Z a-z 0-9 . _ / - and a value of 1-128 characters")
    if not models or not all(isinstance(m, str) and 0 < len(m) <= 128 for m in models):
        raise NodeError(f"node {name}: expected at least one model name of 1-128 characters, found {list(models)!r}")


def _row(row: Any) -> Node:
    return Node(name=row.name, url=row.url, labels=json.loads(row.labels), models=tuple(json.loads(row.models)),
                state=row.state, health=row.health, source=row.source, last_health_at=row.last_health_at,
                last_error=row.last_error or "")


class NodeRegistry:
    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine
        metadata.create_all(engine)

    def all(self) -> list[Node]:
        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(nodes_table).order_by(nodes_table.c.name)).all()
        return [_row(r) for r in rows]

    def get(self, name: str) -> Node | None:
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(nodes_table).where(nodes_table.c.name == name)).first()
        return _row(row) if row else None

    def require(self, name: str) -> Node:
        node = self.get(name)
        if node is None:
            known = [n.name for n in self.all()]
            raise NodeError(f"no node named {name[:64]!r}; known nodes: {known}")
        return node

    def add(self, name: str, url: str, labels: dict[str, str], models: list[str] | tuple[str, ...],
            source: str = "admin") -> Node:
        validate_node(name, url, labels, models)
        with self._engine.begin() as conn:
            if conn.execute(sa.select(nodes_table.c.name).where(nodes_table.c.name == name)).first():
                raise NodeError(f"node {name!r} already exists: remove it first or change it with update")
            conn.execute(nodes_table.insert().values(
                name=name, url=url, labels=json.dumps(labels, sort_keys=True), models=json.dumps(list(models)),
                state="active", health="unknown", source=source, last_error="", updated_at=_now()))
        return self.require(name)

    def update(self, name: str, *, url: str, labels: dict[str, str], models: list[str] | tuple[str, ...]) -> Node:
        validate_node(name, url, labels, models)
        with self._engine.begin() as conn:
            result = conn.execute(nodes_table.update().where(nodes_table.c.name == name).values(
                url=url, labels=json.dumps(labels, sort_keys=True), models=json.dumps(list(models)),
                updated_at=_now()))
        if result.rowcount == 0:
            raise NodeError(f"no node named {name[:64]!r}")
        return self.require(name)

    def remove(self, name: str) -> Node:
        node = self.require(name)
        with self._engine.begin() as conn:
            conn.execute(nodes_table.delete().where(nodes_table.c.name == name))
        return node

    def set_state(self, name: str, state: str, *, expect: tuple[str, ...] | None = None) -> Node | None:
        """Change the lifecycle state; with ``expect``, only from one of those states (returns None
        when the node was in another state, so concurrent gateways do not fight)."""
        if state not in STATES:
            raise NodeError(f"node state must be one of {list(STATES)}, found {state!r}")
        where = [nodes_table.c.name == name]
        if expect is not None:
            where.append(nodes_table.c.state.in_(expect))
        with self._engine.begin() as conn:
            result = conn.execute(nodes_table.update().where(*where).values(state=state, updated_at=_now()))
        if result.rowcount == 0:
            if expect is None:
                raise NodeError(f"no node named {name[:64]!r}")
            return None
        return self.require(name)

    def set_health(self, name: str, health: str, error: str = "") -> bool:
        """Record a probe result; True when the stored health changed."""
        if health not in HEALTH:
            raise NodeError(f"node health must be one of {list(HEALTH)}, found {health!r}")
        with self._engine.begin() as conn:
            result = conn.execute(nodes_table.update().where(
                nodes_table.c.name == name, nodes_table.c.health != health,
            ).values(health=health, last_error=error[:500], last_health_at=_now(), updated_at=_now()))
            if result.rowcount == 0:
                conn.execute(nodes_table.update().where(nodes_table.c.name == name).values(last_health_at=_now()))
        return result.rowcount > 0

    def sync(self, wanted: list[Node], source: str) -> list[dict[str, Any]]:
        """Make the nodes of ``source`` exactly ``wanted`` (added, updated or removed); nodes of
        other sources are left alone, and a name an admin added is not taken over. Returns one
        change description per change, for the caller to audit."""
        changes: list[dict[str, Any]] = []
        current = {n.name: n for n in self.all()}
        for node in wanted:
            have = current.get(node.name)
            if have is None:
                self.add(node.name, node.url, node.labels, node.models, source=source)
                changes.append({"change": "added", "node": node.name, "url": node.url, "labels": node.labels,
                                "models": list(node.models), "source": source})
            elif have.source != source:
                changes.append({"change": "skipped", "node": node.name, "reason": f"registered by {have.source}"})
            elif (have.url, have.labels, have.models) != (node.url, node.labels, tuple(node.models)):
                self.update(node.name, url=node.url, labels=node.labels, models=node.models)
                changes.append({"change": "updated", "node": node.name, "url": node.url, "labels": node.labels,
                                "models": list(node.models), "source": source})
        names = {n.name for n in wanted}
        for have in current.values():
            if have.source == source and have.name not in names:
                self.remove(have.name)
                changes.append({"change": "removed", "node": have.name, "source": source})
        return changes
