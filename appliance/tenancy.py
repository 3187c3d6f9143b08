"""Tenants, their API keys, and the check of any presented key (tenant or admin).

A key looks like ``sov_<key id>_<secret>`` (see appliance/apikeys.py). Only the key id and
``sha256(secret)`` are stored; the secret is shown once at creation. Checking a key looks the key
id up and compares hashes in constant time, so a wrong key and an unknown key take the same path.

A tenant has model grants (glob patterns, stored here, not in the policy files) which widen what
its policy allows; the shipped default policy allows no model. A disabled tenant's keys fail with
``tenant_disabled``. Deleting a tenant revokes its keys and keeps its row (marked deleted) so its
name, which names its audit stream, is never given to another tenant.

Databases made before keys had scopes, expiry and last use, or tenants had grants, are migrated
when opened (ALTER TABLE ADD COLUMN; old keys get scope ``inference`` and no expiry).
"""

from __future__ import annotations

import datetime as dt
import hmac
import json
import re
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from appliance.admins import AdminStore, admin_keys_table, admins_table
from appliance.apikeys import (
    ADDED_KEY_COLUMNS,
    DUMMY_HASH,
    KEY_FORMAT,
    TENANT_SCOPES,
    IssuedKey,
    KeyCache,
    KeyCheck,
    KeyInfo,
    add_missing_columns,
    check_label,
    check_scopes,
    hash_secret,
    key_columns,
    new_key,
    now_utc,
    parse_ts,
    row_to_info,
    split_key,
    ts,
)
from appliance.errors import TenancyError

__all__ = ["KEY_FORMAT", "IssuedKey", "KeyCheck", "KeyInfo", "Tenant", "TenantStore"]

metadata = sa.MetaData()

tenants_table = sa.Table(
    "tenants",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.Column("disabled", sa.Boolean, nullable=False, default=False),
    sa.Column("models", sa.Text, nullable=False, default="[]"),
    sa.Column("deleted_at", sa.String(40), nullable=True),
)

api_keys_table = sa.Table(
    "api_keys",
    metadata,
    sa.Column("key_id", sa.String(32), primary_key=True),
    sa.Column("tenant", sa.String(64), sa.ForeignKey("tenants.name"), nullable=False, index=True),
    sa.Column("secret_sha256", sa.String(64), nullable=False),
    *key_columns(),
)

TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
MODEL_GLOB = re.compile(r"^[A-Za-z0-9._*?:/\[\]-]{1,128}$")
MAX_GRANTS = 64
ADDED_TENANT_COLUMNS = {"models": "TEXT NOT NULL DEFAULT '[]'", "deleted_at": "VARCHAR(40)"}


@dataclass(frozen=True)
class Tenant:
    name: str
    created_at: str
    disabled: bool
    models: tuple[str, ...] = ()
    deleted_at: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "models": list(self.models)}


def check_models(models: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Model grants: names or glob patterns (``SmolLM2-*``, ``*``), at most MAX_GRANTS."""
    found = tuple(dict.fromkeys(m.strip() for m in models if m.strip()))
    bad = [m for m in found if not MODEL_GLOB.match(m)]
    if bad or len(found) > MAX_GRANTS:
        raise TenancyError(
            f"models: expected at most {MAX_GRANTS} names or glob patterns of letters, digits and ._*?:/[]-, "
            f"at most 128 characters each, found {len(found)}" + (f", invalid: {[b[:64] for b in bad[:3]]}" if bad
                                                                  else ""))
    return found


def _tenant(row: Any) -> Tenant:
    return Tenant(row.name, row.created_at, bool(row.disabled), tuple(json.loads(row.models or "[]")),
                  row.deleted_at)


class TenantStore:
    def __init__(self, engine: sa.Engine, *, cache_ttl_s: float = 5.0) -> None:
        self._engine = engine
        self.cache = KeyCache(cache_ttl_s)
        metadata.create_all(engine)
        add_missing_columns(engine, "tenants", ADDED_TENANT_COLUMNS)
        add_missing_columns(engine, "api_keys", ADDED_KEY_COLUMNS)
        self.admins = AdminStore(engine, self.cache)

    # -- tenants ---------------------------------------------------------------------------

    def create_tenant(self, name: str, models: list[str] | tuple[str, ...] = ()) -> Tenant:
        if not TENANT_NAME.match(name):
            raise TenancyError(
                f"invalid tenant name {name!r}: expected 1-63 chars of a-z, 0-9 and '-', "
                "starting with a letter or digit"
            )
        grants = check_models(models)
        with self._engine.begin() as conn:
            row = conn.execute(sa.select(tenants_table).where(tenants_table.c.name == name)).first()
            if row is not None and row.deleted_at is not None:
                raise TenancyError(f"tenant {name!r} was deleted at {row.deleted_at}; its name stays with its audit "
                                   "records: expected a new name")
            if row is not None:
                raise TenancyError(f"tenant {name!r} already exists")
            tenant = Tenant(name=name, created_at=ts(now_utc()), disabled=False, models=grants)
            conn.execute(tenants_table.insert().values(name=name, created_at=tenant.created_at, disabled=False,
                                                       models=json.dumps(list(grants))))
        return tenant

    def get_tenant(self, name: str, *, include_deleted: bool = False) -> Tenant | None:
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(tenants_table).where(tenants_table.c.name == name)).first()
        if row is None or (row.deleted_at is not None and not include_deleted):
            return None
        return _tenant(row)

    def list_tenants(self, *, include_deleted: bool = False) -> list[Tenant]:
        stmt = sa.select(tenants_table).order_by(tenants_table.c.name)
        if not include_deleted:
            stmt = stmt.where(tenants_table.c.deleted_at.is_(None))
        with self._engine.connect() as conn:
            return [_tenant(r) for r in conn.execute(stmt).all()]

    def update_tenant(self, name: str, *, models: list[str] | tuple[str, ...] | None = None,
                      disabled: bool | None = None) -> Tenant:
        values: dict[str, Any] = {}
        if models is not None:
            values["models"] = json.dumps(list(check_models(models)))
        if disabled is not None:
            values["disabled"] = disabled
        if not values:
            raise TenancyError("tenant update: expected models or disabled to change, found neither")
        with self._engine.begin() as conn:
            done = conn.execute(tenants_table.update().where(tenants_table.c.name == name,
                                                             tenants_table.c.deleted_at.is_(None)).values(**values))
        if done.rowcount == 0:
            raise TenancyError(f"unknown tenant {name!r}")
        self.cache.drop(tenant=name)
        found = self.get_tenant(name)
        if found is None:
            raise TenancyError(f"tenant {name!r} was deleted while being updated")
        return found

    def delete_tenant(self, name: str) -> list[str]:
        """Mark the tenant deleted and revoke its keys now; returns the revoked key ids. Its audit
        records stay: the audit log is never edited."""
        at = ts(now_utc())
        with self._engine.begin() as conn:
            done = conn.execute(tenants_table.update().where(tenants_table.c.name == name,
                                                             tenants_table.c.deleted_at.is_(None))
                                .values(deleted_at=at, disabled=True, models="[]"))
            if done.rowcount == 0:
                raise TenancyError(f"unknown tenant {name!r}")
            live = sa.or_(api_keys_table.c.revoked_at.is_(None), api_keys_table.c.revoked_at > at)
            ids = [r.key_id for r in conn.execute(sa.select(api_keys_table.c.key_id)
                                                  .where(api_keys_table.c.tenant == name, live))]
            conn.execute(api_keys_table.update().where(api_keys_table.c.tenant == name, live).values(revoked_at=at))
        self.cache.drop(tenant=name)
        return ids

    # -- keys ------------------------------------------------------------------------------

    def issue_key(self, tenant: str, label: str = "", *, scopes: tuple[str, ...] | list[str] = ("inference",),
                  expires_at: dt.datetime | None = None, created_by: str = "") -> IssuedKey:
        check_label(label)
        if "admin" in scopes:
            raise TenancyError("scopes: 'admin' belongs to admin keys, not tenant keys: expected only "
                               f"{list(TENANT_SCOPES)} (create an admin with `appliance admins create NAME`)")
        granted = check_scopes(scopes, TENANT_SCOPES)
        found = self.get_tenant(tenant)
        if found is None:
            raise TenancyError(f"unknown tenant {tenant!r}: create it first")
        key_id, digest, full = new_key()
        expires = None if expires_at is None else ts(expires_at)
        with self._engine.begin() as conn:
            conn.execute(api_keys_table.insert().values(
                key_id=key_id, tenant=tenant, secret_sha256=digest, label=label, created_at=ts(now_utc()),
                scopes=",".join(granted), expires_at=expires, created_by=created_by))
        return IssuedKey(key_id=key_id, owner=tenant, secret=full, scopes=granted, expires_at=expires)

    def list_keys(self, *, tenant: str | None = None, admin: str | None = None,
                  include_revoked: bool = False) -> list[KeyInfo]:
        """Keys of one tenant, one admin, or (neither given) every key, oldest first."""
        now = ts(now_utc())
        found: list[KeyInfo] = []
        with self._engine.connect() as conn:
            for table, owner_col, kind, wanted in ((api_keys_table, "tenant", "tenant", tenant),
                                                   (admin_keys_table, "admin", "admin", admin)):
                if (tenant is not None or admin is not None) and wanted is None:
                    continue
                stmt = sa.select(table).order_by(table.c.created_at)
                if wanted is not None:
                    stmt = stmt.where(table.c[owner_col] == wanted)
                if not include_revoked:
                    stmt = stmt.where(sa.or_(table.c.revoked_at.is_(None), table.c.revoked_at > now))
                found += [row_to_info(r, kind, getattr(r, owner_col)) for r in conn.execute(stmt)]
        return sorted(found, key=lambda k: k.created_at)

    def get_key(self, key_id: str) -> KeyInfo | None:
        with self._engine.connect() as conn:
            for table, owner_col, kind in ((api_keys_table, "tenant", "tenant"), (admin_keys_table, "admin", "admin")):
                row = conn.execute(sa.select(table).where(table.c.key_id == key_id)).first()
                if row is not None:
                    return row_to_info(row, kind, getattr(row, owner_col))
        return None

    def revoke_key(self, key_id: str, *, at: dt.datetime | None = None) -> KeyInfo:
        """Revoke a tenant or admin key now (or at ``at``, a rotation's end of grace)."""
        info = self.get_key(key_id)
        when = ts(at or now_utc())
        if info is None or info.state() == "revoked":
            raise TenancyError(f"no active key with id {key_id!r}")
        table = api_keys_table if info.owner_kind == "tenant" else admin_keys_table
        with self._engine.begin() as conn:
            conn.execute(table.update().where(table.c.key_id == key_id).values(revoked_at=when))
        self.cache.drop(key_id=key_id)
        found = self.get_key(key_id)
        if found is None:
            raise TenancyError(f"key {key_id!r} vanished while being revoked")
        return found

    def rotate_key(self, key_id: str, *, grace: dt.timedelta = dt.timedelta(0),
                   created_by: str = "") -> tuple[IssuedKey, KeyInfo]:
        """A new key with the old one's owner, scopes, label and expiry; the old one is revoked
        after ``grace`` (now when zero). Returns the new key and the old one as it now stands."""
        old = self.get_key(key_id)
        if old is None or old.state() in ("revoked", "expired"):
            raise TenancyError(f"no active key with id {key_id!r} to rotate")
        if grace < dt.timedelta(0):
            raise TenancyError(f"grace period: expected zero or more, found {grace}")
        expires = parse_ts(old.expires_at)
        if old.owner_kind == "tenant":
            new = self.issue_key(old.owner, old.label, scopes=old.scopes, expires_at=expires, created_by=created_by)
        else:
            new = self.admins.issue_key(old.owner, old.label, expires_at=expires, created_by=created_by)
        return new, self.revoke_key(key_id, at=now_utc() + grace)

    def touch(self, key_id: str) -> None:
        """Record that a key was used now (callers limit this to about once a minute per key)."""
        at = ts(now_utc())
        with self._engine.begin() as conn:
            for table in (api_keys_table, admin_keys_table):
                if conn.execute(table.update().where(table.c.key_id == key_id).values(last_used_at=at)).rowcount:
                    return

    # -- checking a presented key ----------------------------------------------------------

    def check(self, presented: str) -> KeyCheck:
        """Check a tenant or admin key against the database (one lookup, one constant-time compare)."""
        key_id, secret = split_key(presented)
        with self._engine.connect() as conn:
            row = conn.execute(
                sa.select(api_keys_table, tenants_table.c.disabled, tenants_table.c.models,
                          tenants_table.c.deleted_at)
                .join(tenants_table, tenants_table.c.name == api_keys_table.c.tenant)
                .where(api_keys_table.c.key_id == (key_id or ""))).first()
            admin_row = None if row is not None else conn.execute(
                sa.select(admin_keys_table, admins_table.c.disabled)
                .join(admins_table, admins_table.c.name == admin_keys_table.c.admin)
                .where(admin_keys_table.c.key_id == (key_id or ""))).first()
        found = row if row is not None else admin_row
        stored = found.secret_sha256 if found is not None else DUMMY_HASH
        ok = hmac.compare_digest(stored, hash_secret(secret))
        if not ok or found is None:
            return KeyCheck("invalid_api_key", key_id)
        now = now_utc()
        revoke_at, expires_at = parse_ts(found.revoked_at), parse_ts(found.expires_at)
        if revoke_at is not None and revoke_at <= now:
            return KeyCheck("invalid_api_key", key_id)
        if expires_at is not None and expires_at <= now:
            return KeyCheck("expired_api_key", key_id, expires_at=expires_at)
        scopes = tuple(s for s in (found.scopes or "").split(",") if s)
        if row is None:
            return KeyCheck("admin_disabled" if found.disabled else "", key_id, admin=found.admin,
                            scopes=("admin",), expires_at=expires_at, revoke_at=revoke_at)
        if row.deleted_at is not None:
            return KeyCheck("invalid_api_key", key_id)
        return KeyCheck("tenant_disabled" if row.disabled else "", key_id, tenant=row.tenant, scopes=scopes,
                        models=tuple(json.loads(row.models or "[]")), expires_at=expires_at, revoke_at=revoke_at)

    def authenticate(self, presented: str) -> tuple[str, str] | None:
        """``(tenant, key_id)`` for a valid, unrevoked, unexpired key of an enabled tenant, else None."""
        check = self.check(presented)
        if not check.ok or check.tenant is None or check.key_id is None:
            return None
        return check.tenant, check.key_id
