"""Verification results as values; the raising API is ``VerificationReport.raise_for_failure``."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import VerificationError


@dataclass(frozen=True)
class TargetInfo:
    """Signed length and sha256 (hex) of one target file."""

    length: int
    sha256: str


@dataclass(frozen=True)
class CheckResult:
    """One numbered check. ``skipped`` checks did not run because an earlier one failed.

    ``path`` (failures only) names the file concerned: a tar member, target or metadata file, the
    trusted root, or the bundle file itself when the failure concerns the whole bundle.
    """

    number: int
    name: str
    passed: bool
    detail: str
    path: str = ""
    skipped: bool = False

    @property
    def label(self) -> str:
        return f"{self.number} {self.name}"


@dataclass(frozen=True)
class VerificationReport:
    """What ``verify_bundle`` found. ``ok`` only when every check passed.

    ``versions`` are the verified TUF versions (root, timestamp, snapshot, targets);
    ``trusted_root`` the bytes of the final verified root, which ``commit_trust`` persists.
    ``digest`` identifies the bundle: sha256 of every byte except target data, which the hashed
    targets.json pins (see ``tar_reader.bundle_digest``); it is not the file's ``sha256sum``.
    ``rollback_checked`` is True only when check 7 compared versions with a trusted-state directory.
    """

    bundle: str
    ok: bool
    checks: list[CheckResult]
    name: str = ""
    version: str = ""
    digest: str = ""
    targets: dict[str, TargetInfo] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    expires: dict[str, str] = field(default_factory=dict)
    timestamp_sha256: str = ""
    trusted_root: bytes = b""
    from_base: tuple[str, ...] = ()  # delta bundle: targets verified in base_dir, not in the tar
    base_dir: str = ""
    rollback_checked: bool = False

    def first_failure(self) -> CheckResult | None:
        for check in self.checks:
            if not check.passed and not check.skipped:
                return check
        return None

    def raise_for_failure(self) -> None:
        """Raise VerificationError for the first failed check; return None when ok."""
        failed = self.first_failure()
        if failed is not None:
            raise VerificationError(check=failed.label, message=failed.detail, path=failed.path)
        if not self.ok:
            raise VerificationError(
                check="0 report", message="expected every check to pass, found an incomplete report"
            )

    def to_dict(self) -> dict[str, object]:
        """JSON-ready summary (no root bytes)."""
        return {
            "bundle": self.bundle,
            "ok": self.ok,
            "name": self.name,
            "version": self.version,
            "digest": self.digest,
            "versions": self.versions,
            "expires": self.expires,
            "from_base": list(self.from_base),
            "rollback_checked": self.rollback_checked,
            "checks": [
                {"number": c.number, "name": c.name, "passed": c.passed, "skipped": c.skipped, "detail": c.detail,
                 "path": c.path}
                for c in self.checks
            ],
            "targets": {p: {"length": t.length, "sha256": t.sha256} for p, t in sorted(self.targets.items())},
        }
