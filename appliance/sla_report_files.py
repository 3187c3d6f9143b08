"""The SLA report's files: Markdown, JSON and a PNG chart, signed, and verified offline.

``write_signed`` writes the chosen renderings into a directory with ``manifest.json`` (the
sha256 and size of each file, the tenant, period and policy digests, the key id) and
``manifest.sig`` (Ed25519 over the manifest's bytes, with the audit signing key, as audit exports
are signed). ``verify_report_dir`` checks such a directory with nothing but the public key, in
numbered checks, always in this order (every check runs when its inputs exist):

 1 report readable      the directory holds manifest.json and manifest.sig
 2 public key           the given PEM is an Ed25519 public key
 3 manifest signature   manifest.sig verifies over manifest.json with that key
 4 manifest schema      manifest.json is an SLA report manifest naming that key
 5 file digests         every file the manifest lists has its sha256 and size; no other report file
 6 report content       sla-report.json (when listed) is of the manifest's tenant and period
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.audit.canonical import canonical_json
from appliance.audit.errors import AuditError
from appliance.audit.keys import AuditKeys, key_id_of, public_key_from_pem, verify_signature
from appliance.sla_report import REPORT_TYPE, SlaReportError
from appliance.sla_report_render import render_markdown, render_png

MANIFEST_TYPE = "sovereign-sla-report-manifest/1"
MANIFEST_NAME, SIGNATURE_NAME = "manifest.json", "manifest.sig"
FILES = {"md": "sla-report.md", "json": "sla-report.json", "png": "sla-report.png"}
FORMATS = (*FILES, "all")
CHECK_NAMES = ("report readable", "public key", "manifest signature", "manifest schema", "file digests",
               "report content")


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def render(report: dict[str, Any], fmt: str) -> dict[str, bytes]:
    """The report's files for ``fmt`` (``md``, ``json``, ``png`` or ``all``), name -> bytes."""
    if fmt not in FORMATS:
        raise SlaReportError(f"format: expected one of {list(FORMATS)}, found {fmt!r}")
    wanted = list(FILES) if fmt == "all" else [fmt]
    out: dict[str, bytes] = {}
    for kind in wanted:
        if kind == "md":
            out[FILES[kind]] = render_markdown(report).encode("utf-8")
        elif kind == "json":
            out[FILES[kind]] = (json.dumps(report, indent=2, sort_keys=True) + "\n").encode("utf-8")
        else:
            out[FILES[kind]] = render_png(report)
    return out


def write_signed(out_dir: Path, report: dict[str, Any], files: dict[str, bytes], keys: AuditKeys) -> dict[str, Any]:
    """Write ``files`` and their signed manifest into ``out_dir``; returns the manifest. A directory
    that already holds a signed report is refused (a report is never silently replaced)."""
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST_NAME).exists():
        raise SlaReportError(f"output directory {out_dir}: expected no signed report in it, found {MANIFEST_NAME}")
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {
        "type": MANIFEST_TYPE, "report_type": REPORT_TYPE, "tenant": report["tenant"], "period": report["period"],
        "created": report["created"], "policy_digests": report["policy"]["in_force"],
        "targets_from": report["policy"]["targets_from"],
        "files": {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                  for name, data in sorted(files.items())},
        "key_id": keys.key_id, "signature_algorithm": "ed25519",
    }
    manifest_bytes = canonical_json(manifest).encode("utf-8")
    for name, data in files.items():
        _atomic_write(out_dir / name, data)
    _atomic_write(out_dir / SIGNATURE_NAME, keys.sign(manifest_bytes).encode("ascii"))
    _atomic_write(out_dir / MANIFEST_NAME, manifest_bytes)  # last: its presence means the report is whole
    return manifest


@dataclass(frozen=True)
class Check:
    number: int
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class VerifyResult:
    path: str
    checks: tuple[Check, ...]
    manifest: dict[str, Any] | None

    @property
    def ok(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def first_failure(self) -> Check | None:
        return next((c for c in self.checks if not c.passed), None)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "checks": [c.__dict__ for c in self.checks],
                "tenant": None if self.manifest is None else self.manifest.get("tenant"),
                "period": None if self.manifest is None else self.manifest.get("period")}


def _schema_problem(manifest: Any) -> str | None:
    if not isinstance(manifest, dict) or manifest.get("type") != MANIFEST_TYPE:
        found = manifest.get("type") if isinstance(manifest, dict) else type(manifest).__name__
        return f"type {MANIFEST_TYPE!r}, found {found!r}"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files or not all(
            name in FILES.values() and isinstance(e, dict) and isinstance(e.get("sha256"), str)
            and isinstance(e.get("bytes"), int) for name, e in files.items()):
        return f"files: a mapping of {sorted(FILES.values())} to sha256 and bytes, found {files!r:.200}"
    for name in ("tenant", "key_id"):
        if not isinstance(manifest.get(name), str):
            return f"{name}: a string, found {manifest.get(name)!r:.80}"
    if not isinstance(manifest.get("period"), dict):
        return f"period: a mapping, found {manifest.get('period')!r:.80}"
    return None


def verify_report_dir(path: Path, public_key_pem: Path | bytes) -> VerifyResult:
    """Verify a signed SLA report directory offline; a value, never raises for a bad report."""
    path = Path(path)
    checks: list[Check] = []

    def add(passed: bool, detail: str) -> None:
        checks.append(Check(len(checks) + 1, CHECK_NAMES[len(checks)], passed, detail))

    try:
        manifest_bytes = (path / MANIFEST_NAME).read_bytes()
        signature = (path / SIGNATURE_NAME).read_text("ascii", errors="replace").strip()
        add(True, f"{path}: {MANIFEST_NAME} and {SIGNATURE_NAME}")
    except OSError as exc:
        add(False, f"expected {MANIFEST_NAME} and {SIGNATURE_NAME} in {path}, found {type(exc).__name__}: "
                   f"{exc.strerror or exc}")
        while len(checks) < len(CHECK_NAMES):
            add(False, "not run: the report is unreadable (check 1)")
        return VerifyResult(str(path), tuple(checks), None)
    key = None
    try:
        pem = public_key_pem if isinstance(public_key_pem, bytes) else Path(public_key_pem).read_bytes()
        key = public_key_from_pem(pem)
        add(True, f"Ed25519 key_id {key_id_of(key)}")
    except (AuditError, OSError) as exc:
        add(False, f"expected an Ed25519 PEM public key, found {exc}")
    if key is None:
        add(False, "not run: no usable public key (check 2)")
    elif verify_signature(key, signature, manifest_bytes):
        add(True, "Ed25519 signature over manifest.json verifies")
    else:
        add(False, f"expected a signature by key_id {key_id_of(key)} over manifest.json, found an invalid one "
                   "(the manifest was changed after signing, or another key signed it)")
    try:
        manifest: Any = json.loads(manifest_bytes)
    except ValueError:
        manifest = None
    problem = _schema_problem(manifest)
    if problem is None and key is not None and manifest["key_id"] != key_id_of(key):
        problem = f"key_id {key_id_of(key)}, found {manifest['key_id']}"
    add(problem is None, f"SLA report of tenant {manifest['tenant']!r}, period {manifest['period'].get('month')}"
        if problem is None else f"manifest: expected {problem}")
    if problem is not None:
        add(False, "not run: the manifest is unusable (check 4)")
        add(False, "not run: the manifest is unusable (check 4)")
        return VerifyResult(str(path), tuple(checks), None)
    add(*_digest_check(path, manifest["files"]))
    add(*_content_check(path, manifest))
    return VerifyResult(str(path), tuple(checks), manifest)


def _digest_check(path: Path, files: dict[str, dict[str, Any]]) -> tuple[bool, str]:
    problems: list[str] = []
    for name, entry in sorted(files.items()):
        try:
            data = (path / name).read_bytes()
        except OSError:
            problems.append(f"{name}: expected a file of {entry['bytes']} bytes, found none")
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"] or len(data) != entry["bytes"]:
            problems.append(f"{name}: expected sha256 {entry['sha256']} ({entry['bytes']} bytes), found {digest} "
                            f"({len(data)} bytes): changed after signing")
    for name in sorted(set(FILES.values()) - set(files)):
        if (path / name).exists():
            problems.append(f"{name}: expected no such file (the manifest does not list it), found one")
    if problems:
        return False, "; ".join(problems)
    return True, f"{len(files)} files match: {', '.join(sorted(files))}"


def _content_check(path: Path, manifest: dict[str, Any]) -> tuple[bool, str]:
    name = FILES["json"]
    if name not in manifest["files"]:
        return True, f"{name} not part of this report (nothing to compare)"
    try:
        report = json.loads((path / name).read_bytes())
    except (OSError, ValueError) as exc:
        return False, f"{name}: expected JSON, found {type(exc).__name__}"
    want = (manifest["tenant"], manifest["period"])
    found = (report.get("tenant"), report.get("period")) if isinstance(report, dict) else (None, None)
    if found != want:
        return False, f"{name}: expected tenant and period {want}, found {found}"
    return True, f"{name} is tenant {want[0]!r}, period {want[1].get('month')}"
