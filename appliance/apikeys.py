"""API keys shared by tenants and admins: format, scopes, expiry, storage columns, a lookup cache.

A key looks like ``sov_<key id>_<secret>``: 16 hex digits of id, 43 url-safe characters of secret
(32 random bytes). Only the id and ``sha256(secret)`` are stored; the full key is shown once.
Tenant keys live in ``api_keys`` (appliance/tenancy.py), admin keys in ``admin_keys``
(appliance/admins.py); both tables have the columns of :func:`key_columns`, so one set of
functions lists, revokes and rotates either.

Scopes: ``inference`` (the OpenAI routes and /v1/usage), ``audit:read`` (the tenant's own audit
export and /v1/usage), ``admin`` (the admin API; admin keys only, and always).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from appliance.errors import TenancyError

SCOPES = ("inference", "audit:read", "admin")
TENANT_SCOPES = ("inference", "audit:read")
KEY_FORMAT = re.compile(r"^sov_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
KEY_ID = re.compile(r"^[0-9a-f]{16}$")
# Compared against when the key id is unknown, so both paths do one constant-time compare.
DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()
MAX_LABEL = 128
_DURATION = re.compile(r"^(\d{1,6})([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def ts(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).isoformat()


def parse_ts(value: str | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromisoformat(value)


def new_key() -> tuple[str, str, str]:
    """``(key_id, secret_sha256, full key)`` of a fresh random key."""
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return key_id, hash_secret(secret), f"sov_{key_id}_{secret}"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def split_key(presented: str) -> tuple[str | None, str]:
    """``(key id, secret)`` of a well-formed key; ``(None, presented)`` otherwise."""
    match = KEY_FORMAT.match(presented)
    return (match.group(1), match.group(2)) if match else (None, presented)


def parse_duration(text: str) -> dt.timedelta:
    match = _DURATION.match(text.strip())
    if not match:
        raise TenancyError(f"duration: expected a number and a unit s/m/h/d such as '90d' or '12h', found {text!r}")
    return dt.timedelta(seconds=int(match.group(1)) * _UNIT_S[match.group(2)])


def parse_expiry(text: str | None, now: dt.datetime | None = None) -> dt.datetime | None:
    """An expiry given as a duration from now (``30d``) or an ISO 8601 time with its zone."""
    if text is None or text == "":
        return None
    now = now or now_utc()
    if _DURATION.match(text.strip()):
        at = now + parse_duration(text)
    else:
        try:
            at = dt.datetime.fromisoformat(text)
        except ValueError:
            raise TenancyError(
                f"expiry: expected a duration such as '90d' or an ISO 8601 time such as "
                f"'2027-01-31T00:00:00+00:00', found {text!r}") from None
        if at.tzinfo is None:
            raise TenancyError(f"expiry: expected a time with its zone (e.g. '+00:00'), found {text!r}")
    if at <= now:
        raise TenancyError(f"expiry: expected a time in the future, found {ts(at)} (now is {ts(now)})")
    return at.astimezone(dt.UTC)


def check_scopes(scopes: Iterable[str], allowed: tuple[str, ...]) -> tuple[str, ...]:
    found = tuple(dict.fromkeys(s.strip() for s in scopes if s.strip()))
    if not found:
        raise TenancyError(f"scopes: expected at least one of {list(allowed)}, found none")
    bad = [s for s in found if s not in allowed]
    if bad:
        raise TenancyError(f"scopes: expected only {list(allowed)}, found {bad}")
    return found


def check_label(label: str) -> str:
    if len(label) > MAX_LABEL or any(ord(c) < 32 for c in label):
        raise TenancyError(f"label: expected at most {MAX_LABEL} printable characters, found {len(label)} "
                           "characters" + (" with control characters" if any(ord(c) < 32 for c in label) else ""))
    return label


def key_columns() -> list[sa.Column[object]]:
    """The columns both key tables have besides the key id, the owner and the hash."""
    return [
        sa.Column("label", sa.String(MAX_LABEL), nullable=False, default=""),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("revoked_at", sa.String(40), nullable=True),  # may lie ahead: a rotation's grace
        sa.Column("scopes", sa.String(128), nullable=False, default="inference"),
        sa.Column("expires_at", sa.String(40), nullable=True),
        sa.Column("last_used_at", sa.String(40), nullable=True),
        sa.Column("created_by", sa.String(128), nullable=False, default=""),
    ]


# Columns added after the first release, with the DDL that adds them to an older database.
ADDED_KEY_COLUMNS = {
    "scopes": "VARCHAR(128) NOT NULL DEFAULT 'inference'",
    "expires_at": "VARCHAR(40)",
    "last_used_at": "VARCHAR(40)",
    "created_by": "VARCHAR(128) NOT NULL DEFAULT ''",
}


def add_missing_columns(engine: sa.Engine, table: str, columns: dict[str, str]) -> list[str]:
    """ALTER TABLE ADD COLUMN for each column an existing table lacks; returns those added. A
    concurrent opener adding the same column first is not an error."""
    present = {c["name"] for c in sa.inspect(engine).get_columns(table)}
    added = []
    for name, ddl in columns.items():
        if name in present:
            continue
        try:
            with engine.begin() as conn:
                conn.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN {name} {ddl}"))
            added.append(name)
        except (sa.exc.OperationalError, sa.exc.ProgrammingError) as exc:  # SQLite, PostgreSQL
            if not any(text in str(exc).lower() for text in ("duplicate column", "already exists")):
                raise
    return added


@dataclass(frozen=True)
class KeyInfo:
    """A key as listed: never its secret or hash."""

    key_id: str
    owner_kind: str  # "tenant" or "admin"
    owner: str
    scopes: tuple[str, ...]
    label: str
    created_at: str
    created_by: str
    expires_at: str | None
    revoked_at: str | None
    last_used_at: str | None

    def state(self, now: dt.datetime | None = None) -> str:
        now = now or now_utc()
        revoked = parse_ts(self.revoked_at)
        if revoked is not None and revoked <= now:
            return "revoked"
        expires = parse_ts(self.expires_at)
        if expires is not None and expires <= now:
            return "expired"
        return "active" if revoked is None else "retiring"

    def to_dict(self) -> dict[str, object]:
        return {**self.__dict__, "scopes": list(self.scopes), "state": self.state()}


@dataclass(frozen=True)
class IssuedKey:
    key_id: str
    owner: str
    secret: str  # the full key; shown once and never stored
    scopes: tuple[str, ...] = ("inference",)
    expires_at: str | None = None
    owner_kind: str = "tenant"

    @property
    def tenant(self) -> str:
        return self.owner


@dataclass(frozen=True)
class KeyCheck:
    """The outcome of checking one presented key. ``code`` is empty when it is valid, else one of
    ``missing_api_key``, ``invalid_api_key``, ``expired_api_key``, ``tenant_disabled``,
    ``admin_disabled``. ``key_id`` is the presented id when the key was well-formed."""

    code: str
    key_id: str | None = None
    tenant: str | None = None
    admin: str | None = None
    scopes: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    expires_at: dt.datetime | None = None
    revoke_at: dt.datetime | None = None  # a rotated key's end of grace

    @property
    def ok(self) -> bool:
        return self.code == ""

    def still_valid(self, now: dt.datetime) -> bool:
        return not any(end is not None and end <= now for end in (self.expires_at, self.revoke_at))


class KeyCache:
    """Valid key checks for ``ttl_s`` seconds, keyed by sha256 of the presented key (the key
    itself is not kept). Revocation and tenant changes in this process drop entries at once.

    Changes made by another process (another gateway worker or host, the CLI) are seen at once
    when ``events`` is set (``appliance.key_events.attach``): every entry is stored with the key
    epoch read *before* its database lookup and is used only while ``epoch()`` still gives that
    number; ``None`` (the epoch cannot be known now) bypasses the cache. Without ``events`` the
    epoch is always 0 and such changes are seen within ``ttl_s``."""

    def __init__(self, ttl_s: float = 5.0, max_entries: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.events: Any = None  # an appliance.key_events.KeyEvents: current() -> int | None
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, int, KeyCheck]] = {}

    @staticmethod
    def fingerprint(presented: str) -> str:
        return hashlib.sha256(presented.encode()).hexdigest()

    def epoch(self) -> int | None:
        """The key epoch now: read it before a lookup and pass it to ``get`` and ``put``."""
        events = self.events
        return 0 if events is None else events.current()  # type: ignore[no-any-return]

    def get(self, fingerprint: str, epoch: int | None = 0) -> KeyCheck | None:
        if epoch is None:
            return None
        with self._lock:
            entry = self._entries.get(fingerprint)
        if entry is None or entry[0] < time.monotonic() or entry[1] != epoch or not entry[2].still_valid(now_utc()):
            return None
        return entry[2]

    def put(self, fingerprint: str, check: KeyCheck, epoch: int | None = 0) -> None:
        """Keep ``check``, looked up after ``epoch`` was read (None: not kept)."""
        if not check.ok or self.ttl_s <= 0 or epoch is None:
            return
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[fingerprint] = (time.monotonic() + self.ttl_s, epoch, check)

    def drop(self, *, key_id: str | None = None, tenant: str | None = None, admin: str | None = None) -> None:
        with self._lock:
            for fp, (_, _, check) in list(self._entries.items()):
                if ((key_id is not None and check.key_id == key_id) or (tenant is not None and check.tenant == tenant)
                        or (admin is not None and check.admin == admin)):
                    del self._entries[fp]


class LastUsed:
    """Decides when a key's ``last_used_at`` is written: at most once per ``every_s`` per key."""

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self._lock = threading.Lock()
        self._written: dict[str, float] = {}

    def due(self, key_id: str) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._written.get(key_id, -1e18) < self.every_s:
                return False
            if len(self._written) > 100_000:
                self._written.clear()
            self._written[key_id] = now
            return True


def row_to_info(row: sa.Row[object], owner_kind: str, owner: str) -> KeyInfo:
    return KeyInfo(
        key_id=row.key_id, owner_kind=owner_kind, owner=owner,  # type: ignore[attr-defined]
        scopes=tuple(s for s in (row.scopes or "").split(",") if s),  # type: ignore[attr-defined]
        label=row.label, created_at=row.created_at, created_by=row.created_by or "",  # type: ignore[attr-defined]
        expires_at=row.expires_at, revoked_at=row.revoked_at,  # type: ignore[attr-defined]
        last_used_at=row.last_used_at,  # type: ignore[attr-defined]
    )
