"""Sealed request content and crypto-shredding: per-tenant data keys, AES-256-GCM.

When a tenant's retention policy says ``store_content``, the prompt and output of a completed
request are kept in its audit record's data as::

    "content": {"alg": "AES-256-GCM", "key_id": "ck-...", "nonce": b64, "ciphertext": b64}

sealed with the tenant's data key; the associated data binds the tenant, the request id and the
key id, so a sealed blob copied into another tenant's or request's record does not open.

Data keys: 32 random bytes per tenant, stored only wrapped (AES-256-GCM under the master key,
associated data = tenant and key id) in ``audit_content_keys``; the master key is a 0600 file in
the secrets directory. A plaintext data key exists only for the duration of one ``seal`` or
``open`` (no cache), so a shred takes effect at once in every process sharing the database.

``shred(tenant)`` records ``admin.tenant_key_shredded`` and then overwrites the wrapped keys:
every sealed content of the tenant becomes unreadable, by anyone, while the records -- whose
hashes cover the ciphertext, not the text -- still verify and export unchanged. Content sealed
after a shred uses a new key (a new ``key_id``).
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Column, Index, String, Table, Text, select, update
from sqlalchemy.exc import SQLAlchemyError

from appliance.audit.canonical import canonical_json, utc_now_ts
from appliance.audit.errors import AuditError
from appliance.audit.log import AuditLog
from appliance.audit.record import ADMIN_STREAM, validate_stream
from appliance.audit.schema import WRITE_OPTION, metadata
from appliance.secrets_store import ensure_secret

ALG = "AES-256-GCM"
MASTER_KEY_FILE = "audit-content-master.key"
_WRAP_CONTEXT = b"sovereign-content-key/v1"
_SEALED_FIELDS = frozenset({"alg", "key_id", "nonce", "ciphertext"})

audit_content_keys = Table(
    "audit_content_keys",
    metadata,
    Column("key_id", String(40), primary_key=True),
    Column("tenant", String(128), nullable=False),
    Column("wrapped", Text, nullable=True),  # base64(nonce || AES-GCM(master, data key)); NULL once shredded
    Column("created_at", String(32), nullable=False),
    Column("shredded_at", String(32), nullable=True),
    Column("shredded_by", String(256), nullable=True),
    Index("ix_audit_content_keys_tenant", "tenant"),
)


class ContentError(AuditError):
    """Sealed content could not be sealed or opened; the message says what was expected."""


class ContentShreddedError(ContentError):
    """The tenant's data key was destroyed: the content is gone for good."""


@dataclass(frozen=True)
class ShredResult:
    tenant: str
    key_ids: list[str]
    shredded_at: str


class ContentSealer:
    """Seal, open and shred tenant content in the audit database of ``log``.

    ``master_key_path``: the 0600 master key file (created when absent and ``create``).
    ``max_plaintext_bytes``: larger texts are refused by ``seal`` (and left out by
    ``seal_or_omit``) so that a record stays under the log's ``max_data_bytes``.
    """

    def __init__(self, log: AuditLog, master_key_path: Path, *, create: bool = True,
                 max_plaintext_bytes: int = 40_000) -> None:
        if max_plaintext_bytes < 1:
            raise ValueError(f"max_plaintext_bytes must be >= 1, found {max_plaintext_bytes}")
        self.log = log
        self.engine = log.engine
        self.max_plaintext_bytes = max_plaintext_bytes
        if not create and not master_key_path.is_file():
            raise ContentError(f"content master key: expected a file at {master_key_path}, found none")
        try:
            raw = base64.urlsafe_b64decode(ensure_secret(master_key_path, 32) + "==")
        except (binascii.Error, ValueError) as exc:
            raise ContentError(f"content master key {master_key_path}: expected base64url text, found "
                               "something else") from exc
        if len(raw) != 32:
            raise ContentError(f"content master key {master_key_path}: expected 32 bytes, found {len(raw)}")
        self._master = AESGCM(raw)
        try:
            audit_content_keys.create(self.engine, checkfirst=True)
        except SQLAlchemyError as exc:
            raise ContentError(f"content keys table unavailable: {type(exc).__name__}") from exc

    # -- sealing ------------------------------------------------------------------------------

    def seal(self, tenant: str, request_id: str, text: str) -> dict[str, str]:
        plain = text.encode("utf-8")
        if len(plain) > self.max_plaintext_bytes:
            raise ContentError(f"content to seal: expected at most {self.max_plaintext_bytes} bytes, "
                               f"found {len(plain)}")
        _check_names(tenant, request_id)
        try:
            key_id, key = self._active_key(tenant)
        except SQLAlchemyError as exc:
            raise ContentError(f"data key of tenant {tenant!r} unavailable: {type(exc).__name__}") from exc
        nonce = os.urandom(12)
        ciphertext = AESGCM(key).encrypt(nonce, plain, _content_aad(tenant, request_id, key_id))
        return {"alg": ALG, "key_id": key_id, "nonce": _b64(nonce), "ciphertext": _b64(ciphertext)}

    def seal_or_omit(self, tenant: str, request_id: str, text: str) -> dict[str, Any]:
        """``seal``, or, for a text over the limit, a note of its size instead of the text."""
        size = len(text.encode("utf-8"))
        if size > self.max_plaintext_bytes:
            return {"omitted": f"larger than {self.max_plaintext_bytes} bytes", "bytes": size}
        return self.seal(tenant, request_id, text)

    def open(self, tenant: str, request_id: str, sealed: Any) -> str:
        _check_names(tenant, request_id)
        if not isinstance(sealed, dict) or set(sealed) != _SEALED_FIELDS:
            found = sorted(sealed) if isinstance(sealed, dict) else type(sealed).__name__
            raise ContentError(f"sealed content: expected the fields {sorted(_SEALED_FIELDS)}, found {found}")
        if sealed["alg"] != ALG:
            raise ContentError(f"sealed content: expected alg {ALG!r}, found {sealed['alg']!r}")
        key_id = sealed["key_id"]
        try:
            with self.engine.connect() as conn:
                row = conn.execute(select(audit_content_keys).where(audit_content_keys.c.key_id == key_id)).first()
        except SQLAlchemyError as exc:
            raise ContentError(f"data key of tenant {tenant!r} unavailable: {type(exc).__name__}") from exc
        if row is None or row.tenant != tenant:
            raise ContentError(f"sealed content of tenant {tenant!r}: expected a data key of that tenant, "
                               f"found no such key {key_id!r}")
        if row.wrapped is None:
            raise ContentShreddedError(
                f"sealed content of tenant {tenant!r} (request {request_id}) cannot be opened: its data key "
                f"{key_id} was destroyed on {row.shredded_at} by {row.shredded_by}")
        key = self._unwrap(tenant, key_id, row.wrapped)
        try:
            plain = AESGCM(key).decrypt(_unb64(sealed["nonce"], "nonce"), _unb64(sealed["ciphertext"], "ciphertext"),
                                        _content_aad(tenant, request_id, key_id))
        except InvalidTag:
            raise ContentError(f"sealed content of tenant {tenant!r}: expected it to authenticate for request "
                               f"{request_id!r}, found a mismatch (altered, or sealed for another request)") from None
        return plain.decode("utf-8")

    # -- shredding ----------------------------------------------------------------------------

    def shred(self, tenant: str, *, actor: str) -> ShredResult:
        """Destroy every data key of ``tenant`` (recorded first, then overwritten)."""
        _check_names(tenant, "-")
        k = audit_content_keys.c
        with self.engine.connect() as conn:
            rows = conn.execute(select(k.key_id, k.wrapped).where(k.tenant == tenant).order_by(k.created_at)).all()
        live = [row.key_id for row in rows if row.wrapped is not None]
        if not rows:
            raise ContentError(f"shred: expected a tenant with stored content keys, found none for {tenant!r}")
        if not live:
            raise ContentError(f"shred: every data key of tenant {tenant!r} is already destroyed")
        now = utc_now_ts()
        self.log.append("admin.tenant_key_shredded", stream=ADMIN_STREAM, actor=actor, tenant=tenant,
                        data={"key_ids": live, "alg": ALG})
        with self.engine.begin() as conn:
            conn.execute(update(audit_content_keys).where(k.tenant == tenant, k.key_id.in_(live))
                         .values(wrapped=None, shredded_at=now, shredded_by=actor))
        return ShredResult(tenant, live, now)

    # -- keys -----------------------------------------------------------------------------------

    def _active_key(self, tenant: str) -> tuple[str, bytes]:
        """The tenant's current data key, made on first use (in a write transaction that
        re-checks, so two gateways on SQLite make one; on PostgreSQL both may insert, and both
        then use the older, the same for everyone)."""
        k = audit_content_keys.c
        stmt = (select(k.key_id, k.wrapped).where(k.tenant == tenant, k.wrapped.is_not(None))
                .order_by(k.created_at, k.key_id).limit(1))
        with self.engine.connect() as conn:
            row = conn.execute(stmt).first()
        if row is None:
            with self.engine.connect() as conn:
                conn.execution_options(**{WRITE_OPTION: True})  # SQLite: BEGIN IMMEDIATE
                with conn.begin():
                    if conn.execute(stmt).first() is None:
                        key_id = "ck-" + secrets.token_hex(8)
                        key = AESGCM.generate_key(bit_length=256)
                        nonce = os.urandom(12)
                        wrapped = _b64(nonce + self._master.encrypt(nonce, key, _wrap_aad(tenant, key_id)))
                        conn.execute(audit_content_keys.insert().values(
                            key_id=key_id, tenant=tenant, wrapped=wrapped, created_at=utc_now_ts()))
                    row = conn.execute(stmt).first()
            assert row is not None
        return row.key_id, self._unwrap(tenant, row.key_id, row.wrapped)

    def _unwrap(self, tenant: str, key_id: str, wrapped: str) -> bytes:
        blob = _unb64(wrapped, "wrapped key")
        try:
            return self._master.decrypt(blob[:12], blob[12:], _wrap_aad(tenant, key_id))
        except InvalidTag:
            raise ContentError(f"data key {key_id} of tenant {tenant!r}: expected it to unwrap with the master "
                               "key, found a mismatch (another appliance's master key, or an altered row)") from None


def _check_names(tenant: str, request_id: str) -> None:
    try:
        validate_stream(tenant)
    except ValueError as exc:
        raise ContentError(f"sealed content: {exc}") from None
    if tenant == ADMIN_STREAM or not isinstance(request_id, str) or not request_id:
        raise ContentError(f"sealed content: expected a tenant and a request id, found {tenant!r}, {request_id!r}")


def _content_aad(tenant: str, request_id: str, key_id: str) -> bytes:
    return canonical_json({"v": 1, "tenant": tenant, "request_id": request_id, "key_id": key_id}).encode()


def _wrap_aad(tenant: str, key_id: str) -> bytes:
    return _WRAP_CONTEXT + b"\0" + tenant.encode() + b"\0" + key_id.encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise ContentError(f"sealed content: expected base64 {what}, found {str(text)[:24]!r}") from None
