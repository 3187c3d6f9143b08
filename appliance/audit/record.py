"""One audit record: its fields, the hash rule, and the validation of what may be appended.

``hash = sha256(canonical_json(body))`` where ``body`` holds every field but ``hash`` itself:
``stream, seq, ts, event_type, actor, tenant, request_id, data, prev_hash`` (``data`` as a JSON
object, not as text). ``prev_hash`` is the previous record's ``hash`` in the same stream, or
``genesis_hash(stream)`` for seq 1. The database row id is storage detail and is not hashed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from appliance.audit.canonical import canonical_json, is_canonical_ts, sha256_hex

ADMIN_STREAM = "_admin"
REQUEST_EVENT_TYPES: frozenset[str] = frozenset(
    {"accepted", "completed", "failed", "aborted", "rejected", "abandoned", "retried"})
_PREFIXED_EVENT = re.compile(r"^(admin|installer)\.[A-Za-z0-9_.:-]{1,64}$")
# Tenant stream names: what a tenant name may be; "_admin" is the one reserved name.
_STREAM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_HASH_HEX = re.compile(r"^[0-9a-f]{64}$")
MAX_TEXT_FIELD = 256

RECORD_FIELDS: tuple[str, ...] = (
    "stream", "seq", "ts", "event_type", "actor", "tenant", "request_id", "data", "prev_hash", "hash",
)


def validate_stream(stream: str) -> str:
    if stream != ADMIN_STREAM and not (isinstance(stream, str) and _STREAM_NAME.match(stream)):
        raise ValueError(
            f"audit stream must be {ADMIN_STREAM!r} or a tenant name "
            f"([A-Za-z0-9][A-Za-z0-9_.:-]{{0,127}}), found {stream!r}"
        )
    return stream


def validate_event_type(event_type: str) -> str:
    if event_type in REQUEST_EVENT_TYPES or (isinstance(event_type, str) and _PREFIXED_EVENT.match(event_type)):
        return event_type
    raise ValueError(
        f"audit event_type must be one of {sorted(REQUEST_EVENT_TYPES)} or 'admin.*' / 'installer.*', "
        f"found {event_type!r}"
    )


def _check_text(name: str, value: Any, *, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT_FIELD:
        raise ValueError(f"audit {name} must be a non-empty string of at most {MAX_TEXT_FIELD} chars, found {value!r}")


@dataclass(frozen=True)
class AuditRecord:
    """A committed (or exported) record. ``data`` is a parsed JSON object: treat it as read-only."""

    stream: str
    seq: int
    ts: str
    event_type: str
    actor: str
    tenant: str | None
    request_id: str | None
    data: dict[str, Any] = field(hash=False)
    prev_hash: str
    hash: str

    def body(self) -> dict[str, Any]:
        """Every field that the hash covers."""
        return {
            "stream": self.stream, "seq": self.seq, "ts": self.ts, "event_type": self.event_type,
            "actor": self.actor, "tenant": self.tenant, "request_id": self.request_id,
            "data": self.data, "prev_hash": self.prev_hash,
        }

    def compute_hash(self) -> str:
        return compute_record_hash(self.body())

    def to_dict(self) -> dict[str, Any]:
        return {**self.body(), "hash": self.hash}

    def to_json_line(self) -> str:
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, obj: Any) -> AuditRecord:
        """Rebuild a record from its exported form; ``ValueError`` names the first bad field."""
        if not isinstance(obj, dict):
            raise ValueError(f"record must be a JSON object, found {type(obj).__name__}")
        if set(obj) != set(RECORD_FIELDS):
            raise ValueError(f"record fields: expected {sorted(RECORD_FIELDS)}, found {sorted(obj)}")
        seq = obj["seq"]
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise ValueError(f"record seq must be an integer >= 1, found {seq!r}")
        for name in ("stream", "ts", "event_type", "actor", "prev_hash", "hash"):
            if not isinstance(obj[name], str):
                raise ValueError(f"record {name} must be a string, found {obj[name]!r}")
        for name in ("tenant", "request_id"):
            if obj[name] is not None and not isinstance(obj[name], str):
                raise ValueError(f"record {name} must be a string or null, found {obj[name]!r}")
        if not isinstance(obj["data"], dict):
            raise ValueError(f"record data must be a JSON object, found {type(obj['data']).__name__}")
        return cls(**{name: obj[name] for name in RECORD_FIELDS})

    @classmethod
    def from_row(cls, row: Any) -> AuditRecord:
        """Rebuild from a database row (``data`` is stored as canonical JSON text)."""
        try:
            data = json.loads(row.data)
        except (TypeError, ValueError):
            data = {"__undecodable__": str(row.data)[:64]}  # fails the hash check, naming the seq
        if not isinstance(data, dict):
            data = {"__not_an_object__": data}
        return cls(
            stream=row.stream, seq=row.seq, ts=row.ts, event_type=row.event_type, actor=row.actor,
            tenant=row.tenant, request_id=row.request_id, data=data, prev_hash=row.prev_hash, hash=row.hash,
        )


def compute_record_hash(body: dict[str, Any]) -> str:
    return sha256_hex(canonical_json(body))


def well_formed_problem(record: AuditRecord) -> str | None:
    """Describe the first field a valid appended record could not have, or ``None``."""
    try:
        validate_stream(record.stream)
        validate_event_type(record.event_type)
        _check_text("actor", record.actor, optional=False)
        _check_text("tenant", record.tenant, optional=True)
        _check_text("request_id", record.request_id, optional=True)
    except ValueError as exc:
        return str(exc)
    if not is_canonical_ts(record.ts):
        return f"ts must be UTC RFC 3339 with microseconds (YYYY-MM-DDTHH:MM:SS.ffffffZ), found {record.ts!r}"
    for name in ("prev_hash", "hash"):
        if not _HASH_HEX.match(getattr(record, name)):
            return f"{name} must be 64 lowercase hex digits, found {getattr(record, name)!r}"
    return None


def validate_append(
    event_type: str, stream: str, actor: str, tenant: str | None, request_id: str | None
) -> str | None:
    """Check the caller's fields; returns the tenant to record (a tenant stream's own name)."""
    validate_event_type(event_type)
    validate_stream(stream)
    _check_text("actor", actor, optional=False)
    _check_text("tenant", tenant, optional=True)
    _check_text("request_id", request_id, optional=True)
    if stream != ADMIN_STREAM:
        if tenant is not None and tenant != stream:
            raise ValueError(
                f"a tenant stream holds only its own tenant's events: expected tenant {stream!r}, found {tenant!r}"
            )
        return stream
    return tenant
