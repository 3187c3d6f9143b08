"""Canonical JSON, hashing and timestamps: the byte-exact rules every audit hash depends on.

Canonical JSON here is ``json.dumps`` with sorted keys, no whitespace, UTF-8 (no ``\\u``
escapes for non-ASCII) and no NaN/Infinity. An independent verifier reproduces a record hash by
serialising the record the same way; ``docs`` and the export manifest describe the rule.
Timestamps are UTC RFC 3339 with exactly six fractional digits and a ``Z`` suffix, so their
string order is their time order (the store compares them as strings).
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from appliance.audit.errors import AuditError

GENESIS_PREFIX = "sovereign-audit-genesis:"
TS_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def canonical_json(obj: Any) -> str:
    """Serialise ``obj`` canonically; raises ``AuditError`` for values JSON cannot carry exactly."""
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        text.encode("utf-8")  # lone surrogates would make the hash input ambiguous
    except (TypeError, ValueError, UnicodeEncodeError) as exc:
        raise AuditError(f"audit data must be plain JSON (str keys, finite numbers): {exc}") from None
    return text


def sha256_hex(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def genesis_hash(stream: str) -> str:
    """The ``prev_hash`` of a stream's seq 1: binds the chain to the stream's name."""
    return sha256_hex(GENESIS_PREFIX + stream)


def format_ts(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise ValueError(f"timestamp must be timezone-aware: expected an offset, found naive {moment!r}")
    return moment.astimezone(UTC).strftime(TS_FORMAT)


def utc_now_ts() -> str:
    return format_ts(datetime.now(UTC))


def parse_ts(value: str) -> datetime:
    """Parse any RFC 3339 / ISO 8601 timestamp with an offset (``Z`` allowed) into aware UTC."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"timestamp must be ISO 8601 / RFC 3339, found {value!r}") from None
    if moment.tzinfo is None:
        raise ValueError(f"timestamp must carry an offset such as 'Z' or '+00:00', found {value!r}")
    return moment.astimezone(UTC)


def normalize_ts(value: str | datetime | None) -> str | None:
    """Bring a bound given as text or datetime into the stored form, so string comparison works."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return format_ts(value)
    return format_ts(parse_ts(value))


def is_canonical_ts(value: str) -> bool:
    try:
        return format_ts(parse_ts(value)) == value
    except ValueError:
        return False
