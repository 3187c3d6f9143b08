"""Verification results as values: what was checked, what passed, the first failure.

The raising API (``raise_for_failure``) is built on top of these, never the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from appliance.audit.chain import ChainFailure
from appliance.audit.errors import AuditIntegrityError


@dataclass(frozen=True)
class StreamReport:
    stream: str
    records: int
    head_seq: int | None
    head_hash: str | None
    checkpoints: int
    last_checkpoint_seq: int | None
    failure: ChainFailure | None

    @property
    def ok(self) -> bool:
        return self.failure is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "stream": self.stream, "ok": self.ok, "records": self.records, "head_seq": self.head_seq,
            "head_hash": self.head_hash, "checkpoints": self.checkpoints,
            "last_checkpoint_seq": self.last_checkpoint_seq,
            "failure": None if self.failure is None else self.failure.to_dict(),
        }


@dataclass(frozen=True)
class ChainReport:
    """Result of ``AuditLog.verify``: one ``StreamReport`` per stream checked."""

    streams: tuple[StreamReport, ...]

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.streams)

    @property
    def streams_checked(self) -> int:
        return sum(1 for s in self.streams if s.stream != "_all")

    @property
    def records_checked(self) -> int:
        """Records walked (each once, although it is a leaf of its stream's tree and of ``_all``)."""
        return sum(s.records for s in self.streams if s.stream != "_all")

    @property
    def first_failure(self) -> ChainFailure | None:
        return next((s.failure for s in self.streams if s.failure is not None), None)

    def raise_for_failure(self) -> None:
        if self.first_failure is not None:
            raise self.first_failure.to_error()

    def to_dict(self) -> dict[str, Any]:
        first = self.first_failure
        return {
            "ok": self.ok, "streams_checked": self.streams_checked, "records_checked": self.records_checked,
            "first_failure": None if first is None else first.to_dict(),
            "streams": [s.to_dict() for s in self.streams],
        }


@dataclass(frozen=True)
class CheckResult:
    """One numbered check of an export verification."""

    number: int
    name: str
    passed: bool
    detail: str
    expected: str = ""
    found: str = ""
    seq: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"number": self.number, "name": self.name, "passed": self.passed, "detail": self.detail,
                "expected": self.expected, "found": self.found, "seq": self.seq}


@dataclass(frozen=True)
class ExportReport:
    """Result of ``verify_export``: every check in its fixed order, passed or not."""

    path: str
    stream: str | None
    checks: tuple[CheckResult, ...]
    count: int | None = None
    first_seq: int | None = None
    last_seq: int | None = None
    key_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def first_failure(self) -> CheckResult | None:
        return next((c for c in self.checks if not c.passed), None)

    def raise_for_failure(self) -> None:
        failed = self.first_failure
        if failed is not None:
            raise AuditIntegrityError(
                failed.seq, self.stream or "?", failed.expected or "check to pass",
                failed.found or failed.detail, check=f"{failed.number} {failed.name}",
            )

    def to_dict(self) -> dict[str, Any]:
        first = self.first_failure
        return {
            "ok": self.ok, "path": self.path, "stream": self.stream, "count": self.count,
            "first_seq": self.first_seq, "last_seq": self.last_seq, "key_id": self.key_id,
            "first_failure": None if first is None else first.to_dict(),
            "checks": [c.to_dict() for c in self.checks], **self.extra,
        }
