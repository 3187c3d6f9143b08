"""Named admins and their keys, and the first admin of an install.

An admin key is a key with scope ``admin`` that belongs to a named admin, not to a tenant; every
admin API action is recorded under ``admin:<name>``. Admins are created with ``appliance admins
create NAME`` (on the appliance host: holding the install root is the trust anchor), by the
installer's first-admin key (:func:`bootstrap_admins`), or by an admin through the admin API.

``bootstrap_admins`` runs when a runtime opens, before it serves:

1. an admin exists: nothing to do, except that a leftover ``secrets/admin.token`` (the shared
   token of releases before named admins) is deleted, since it no longer opens anything;
2. no admin, and ``secrets/admin.key`` holds a key (written by the installer, which printed it
   once): admin ``admin`` is created with that key's id and hash (the file is kept, 0600, for the
   operator to move into a password safe);
3. no admin, and ``secrets/admin.token`` exists (an upgrade from the shared token): admin
   ``admin`` is created with a new key written to ``secrets/admin.key`` (0600), and the token file
   is deleted;
4. neither: no admin; the admin API refuses every call until ``appliance admins create NAME``.
Each step that creates or deletes something is an audit event on the ``_admin`` stream.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from appliance.apikeys import (
    ADDED_KEY_COLUMNS,
    IssuedKey,
    KeyCache,
    add_missing_columns,
    check_label,
    hash_secret,
    key_columns,
    new_key,
    now_utc,
    split_key,
    ts,
)
from appliance.audit import AuditLog
from appliance.errors import TenancyError
from appliance.secrets_store import write_secret

log = logging.getLogger(__name__)
metadata = sa.MetaData()
ADMIN_NAME = re.compile(r"^[a-z][a-z0-9._-]{0,62}$")
FIRST_ADMIN = "admin"
ADMIN_KEY_FILE = "admin.key"
LEGACY_TOKEN_FILE = "admin.token"

admins_table = sa.Table(
    "admins",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.Column("created_by", sa.String(128), nullable=False, default=""),
    sa.Column("disabled", sa.Boolean, nullable=False, default=False),
)

admin_keys_table = sa.Table(
    "admin_keys",
    metadata,
    sa.Column("key_id", sa.String(32), primary_key=True),
    sa.Column("admin", sa.String(64), sa.ForeignKey("admins.name"), nullable=False, index=True),
    sa.Column("secret_sha256", sa.String(64), nullable=False),
    *key_columns(),
)


@dataclass(frozen=True)
class Admin:
    name: str
    created_at: str
    created_by: str
    disabled: bool


class AdminStore:
    def __init__(self, engine: sa.Engine, cache: KeyCache) -> None:
        self._engine = engine
        self._cache = cache
        metadata.create_all(engine)
        add_missing_columns(engine, "admin_keys", ADDED_KEY_COLUMNS)

    def create_admin(self, name: str, created_by: str, *, key: str | None = None, label: str = "") -> IssuedKey:
        """Create admin ``name`` with its first key (a new one, or ``key`` when enrolling a key made
        elsewhere, such as the installer's). Returns the key; only its hash is stored."""
        if not ADMIN_NAME.match(name):
            raise TenancyError(f"invalid admin name {name!r}: expected 1-63 chars of a-z, 0-9, '.', '_' and '-', "
                               "starting with a letter")
        with self._engine.begin() as conn:
            if conn.execute(sa.select(admins_table.c.name).where(admins_table.c.name == name)).first():
                raise TenancyError(f"admin {name!r} already exists")
            conn.execute(admins_table.insert().values(name=name, created_at=ts(now_utc()), created_by=created_by,
                                                      disabled=False))
        return self.issue_key(name, label or "first key", created_by=created_by, key=key)

    def issue_key(self, admin: str, label: str = "", *, expires_at: dt.datetime | None = None,
                  created_by: str = "", key: str | None = None) -> IssuedKey:
        check_label(label)
        found = self.get_admin(admin)
        if found is None:
            raise TenancyError(f"unknown admin {admin!r}: create it first with `appliance admins create {admin}`")
        if found.disabled:
            raise TenancyError(f"admin {admin!r} is disabled: expected an enabled admin")
        if key is None:
            key_id, digest, full = new_key()
        else:
            key_id_or_none, secret = split_key(key)
            if key_id_or_none is None:
                raise TenancyError("admin key: expected the format sov_<16 hex digits>_<43 characters>, found "
                                   "something else")
            key_id, digest, full = key_id_or_none, hash_secret(secret), key
        expires = None if expires_at is None else ts(expires_at)
        with self._engine.begin() as conn:
            conn.execute(admin_keys_table.insert().values(
                key_id=key_id, admin=admin, secret_sha256=digest, label=label, created_at=ts(now_utc()),
                scopes="admin", expires_at=expires, created_by=created_by))
        return IssuedKey(key_id=key_id, owner=admin, secret=full, scopes=("admin",), expires_at=expires,
                         owner_kind="admin")

    def get_admin(self, name: str) -> Admin | None:
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(admins_table).where(admins_table.c.name == name)).first()
        return Admin(row.name, row.created_at, row.created_by, bool(row.disabled)) if row else None

    def list_admins(self) -> list[Admin]:
        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(admins_table).order_by(admins_table.c.name)).all()
        return [Admin(r.name, r.created_at, r.created_by, bool(r.disabled)) for r in rows]

    def count(self) -> int:
        with self._engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(admins_table)).scalar_one())

    def set_disabled(self, name: str, disabled: bool) -> Admin:
        with self._engine.begin() as conn:
            done = conn.execute(admins_table.update().where(admins_table.c.name == name).values(disabled=disabled))
        if done.rowcount == 0:
            raise TenancyError(f"unknown admin {name!r}")
        self._cache.drop(admin=name)
        found = self.get_admin(name)
        if found is None:
            raise TenancyError(f"admin {name!r} vanished while being updated")
        return found


def bootstrap_admins(admins: AdminStore, audit: AuditLog, secrets_dir: Path) -> str:
    """The first-admin steps of the module docstring; returns what was done, for the log."""
    key_file, token_file = secrets_dir / ADMIN_KEY_FILE, secrets_dir / LEGACY_TOKEN_FILE
    if admins.count() > 0:
        if token_file.exists():
            token_file.unlink()
            audit.append("admin.admin_token_removed", stream="_admin", actor="appliance",
                         data={"file": str(token_file), "reason": "named admins exist"})
            return f"deleted {token_file}: named admins exist, the shared token opens nothing"
        return "admins exist"
    if key_file.exists():
        issued = admins.create_admin(FIRST_ADMIN, "installer", key=key_file.read_text().strip(),
                                     label="installer first admin")
        audit.append("admin.admin_created", stream="_admin", actor="appliance",
                     data={"admin": FIRST_ADMIN, "key_id": issued.key_id, "via": "installer first-admin key"})
        return f"enrolled the installer's first admin {FIRST_ADMIN!r} (key id {issued.key_id})"
    if token_file.exists():
        issued = admins.create_admin(FIRST_ADMIN, "migration", label="replaces the shared admin token")
        write_secret(key_file, issued.secret)
        token_file.unlink()
        audit.append("admin.admin_token_migrated", stream="_admin", actor="appliance",
                     data={"admin": FIRST_ADMIN, "key_id": issued.key_id, "key_file": str(key_file),
                           "removed": str(token_file)})
        log.warning("the shared admin token is gone: admin %r was created, its key is in %s (0600); %s was deleted",
                    FIRST_ADMIN, key_file, token_file)
        return f"migrated the shared admin token to admin {FIRST_ADMIN!r}, key in {key_file}"
    return "no admin: create one with `appliance admins create NAME`"


def ensure_first_admin(admins: AdminStore, audit: AuditLog, secrets_dir: Path, actor: str) -> Path | None:
    """For the quickstart: bootstrap as at start, and when that leaves no admin, create admin
    ``admin`` with its key in ``secrets/admin.key`` (0600). Returns that file when it holds the key."""
    bootstrap_admins(admins, audit, secrets_dir)
    key_file = secrets_dir / ADMIN_KEY_FILE
    if admins.count() == 0:
        issued = admins.create_admin(FIRST_ADMIN, actor, label="first admin")
        write_secret(key_file, issued.secret)
        audit.append("admin.admin_created", stream="_admin", actor=actor,
                     data={"admin": FIRST_ADMIN, "key_id": issued.key_id, "key_file": str(key_file)})
    return key_file if key_file.exists() else None
