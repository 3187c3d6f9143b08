"""Tenants and their API keys.

A key looks like ``sov_<key id>_<secret>``. Only the key id and ``sha256(secret)`` are stored; the
secret is shown once at creation. Authentication looks the key id up and compares hashes in
constant time, so a wrong key and an unknown key take the same path.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

import sqlalchemy as sa

from appliance.errors import TenancyError

metadata = sa.MetaData()

tenants_table = sa.Table(
    "tenants",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.Column("disabled", sa.Boolean, nullable=False, default=False),
)

api_keys_table = sa.Table(
    "api_keys",
    metadata,
    sa.Column("key_id", sa.String(32), primary_key=True),
    sa.Column("tenant", sa.String(64), sa.ForeignKey("tenants.name"), nullable=False, index=True),
    sa.Column("secret_sha256", sa.String(64), nullable=False),
    sa.Column("label", sa.String(128), nullable=False, default=""),
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.Column("revoked_at", sa.String(40), nullable=True),
)

TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
KEY_FORMAT = re.compile(r"^sov_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
# Compared against when the key id is unknown, so both paths do one constant-time compare.
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()


@dataclass(frozen=True)
class Tenant:
    name: str
    created_at: str
    disabled: bool


@dataclass(frozen=True)
class IssuedKey:
    key_id: str
    tenant: str
    secret: str  # the full key; shown to the admin once and never stored


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


class TenantStore:
    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine
        metadata.create_all(engine)

    def create_tenant(self, name: str) -> Tenant:
        if not TENANT_NAME.match(name):
            raise TenancyError(
                f"invalid tenant name {name!r}: expected 1-63 chars of a-z, 0-9 and '-', "
                "starting with a letter or digit"
            )
        with self._engine.begin() as conn:
            exists = conn.execute(sa.select(tenants_table.c.name).where(tenants_table.c.name == name)).first()
            if exists:
                raise TenancyError(f"tenant {name!r} already exists")
            tenant = Tenant(name=name, created_at=_now(), disabled=False)
            conn.execute(tenants_table.insert().values(name=name, created_at=tenant.created_at, disabled=False))
        return tenant

    def get_tenant(self, name: str) -> Tenant | None:
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(tenants_table).where(tenants_table.c.name == name)).first()
        return Tenant(row.name, row.created_at, bool(row.disabled)) if row else None

    def list_tenants(self) -> list[Tenant]:
        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(tenants_table).order_by(tenants_table.c.name)).all()
        return [Tenant(r.name, r.created_at, bool(r.disabled)) for r in rows]

    def issue_key(self, tenant: str, label: str = "") -> IssuedKey:
        if self.get_tenant(tenant) is None:
            raise TenancyError(f"unknown tenant {tenant!r}: create it first")
        key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        with self._engine.begin() as conn:
            conn.execute(
                api_keys_table.insert().values(
                    key_id=key_id,
                    tenant=tenant,
                    secret_sha256=hashlib.sha256(secret.encode()).hexdigest(),
                    label=label,
                    created_at=_now(),
                )
            )
        return IssuedKey(key_id=key_id, tenant=tenant, secret=f"sov_{key_id}_{secret}")

    def revoke_key(self, key_id: str) -> None:
        with self._engine.begin() as conn:
            result = conn.execute(
                api_keys_table.update()
                .where(api_keys_table.c.key_id == key_id, api_keys_table.c.revoked_at.is_(None))
                .values(revoked_at=_now())
            )
        if result.rowcount == 0:
            raise TenancyError(f"no active key with id {key_id!r}")

    def authenticate(self, presented: str) -> tuple[str, str] | None:
        """Return ``(tenant, key_id)`` for a valid, unrevoked key of an enabled tenant, else None."""
        match = KEY_FORMAT.match(presented)
        key_id, secret = (match.group(1), match.group(2)) if match else ("", presented)
        with self._engine.connect() as conn:
            row = conn.execute(
                sa.select(api_keys_table, tenants_table.c.disabled)
                .join(tenants_table, tenants_table.c.name == api_keys_table.c.tenant)
                .where(api_keys_table.c.key_id == key_id)
            ).first()
        stored = row.secret_sha256 if row else _DUMMY_HASH
        ok = hmac.compare_digest(stored, hashlib.sha256(secret.encode()).hexdigest())
        if not ok or row is None or row.revoked_at is not None or row.disabled:
            return None
        return row.tenant, row.key_id
