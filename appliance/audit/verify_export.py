"""``verify_export``: check an export offline with nothing but its file and the public key.

Numbered checks, always in this order; every check runs when its inputs exist, so the report
shows everything wrong at once, and the first failure is the one to read first:

 1 export readable       the tar (or directory) holds exactly the three members, within limits
 2 public key            the given PEM is an Ed25519 public key
 3 manifest signature    manifest.sig verifies over manifest.json with that key
 4 manifest schema       manifest.json is an export manifest naming that key
 5 records digest        records.jsonl has the manifest's sha256 and size
 6 record count          records.jsonl holds the manifest's number of records
 7 record chain          the records form one unbroken chain from the anchor (chain.py checks)
 8 range and anchor      first/last seq, anchor and last hash are the manifest's; seq 1 anchors
                         at the stream's genesis hash
 9 period                every record's ts lies in [since, until)
10 stream isolation      every record belongs to the manifest's stream (and tenant)
11 checkpoint            the signed checkpoint verifies and matches the record at its seq
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from appliance.audit.errors import AuditError
from appliance.audit.export_format import EXPORT_TYPE, ExportFiles, ExportLimits, ExportReadError
from appliance.audit.export_scan import Manifest, RecordScan, parse_manifest, scan_records
from appliance.audit.keys import key_id_of, public_key_from_pem, verify_signature
from appliance.audit.reports import CheckResult, ExportReport

CHECK_NAMES = (
    "export readable", "public key", "manifest signature", "manifest schema", "records digest",
    "record count", "record chain", "range and anchor", "period", "stream isolation", "checkpoint",
)


class _Checks:
    def __init__(self) -> None:
        self.results: list[CheckResult] = []

    def add(self, passed: bool, detail: str, expected: str = "", found: str = "", seq: int | None = None) -> None:
        number = len(self.results) + 1
        self.results.append(CheckResult(number, CHECK_NAMES[number - 1], passed, detail, expected, found, seq))

    def skip_rest(self, reason: str) -> None:
        while len(self.results) < len(CHECK_NAMES):
            self.add(False, f"not run: {reason}")


def verify_export(
    path: Path, public_key_pem_path: Path | bytes, *, limits: ExportLimits | None = None
) -> ExportReport:
    """Verify the export at ``path``; a value, never raises for a bad export."""
    path = Path(path)
    checks = _Checks()
    try:
        files = ExportFiles(path, limits or ExportLimits())
    except ExportReadError as exc:
        expected, _, found = str(exc).partition(", found ")
        checks.add(False, str(exc), expected, found)
        checks.skip_rest("the export is unreadable (check 1)")
        return ExportReport(path=str(path), stream=None, checks=tuple(checks.results))
    try:
        return _verify_files(path, files, public_key_pem_path, checks)
    finally:
        files.close()


def _verify_files(path: Path, files: ExportFiles, pem_source: Path | bytes, checks: _Checks) -> ExportReport:
    checks.add(True, f"{path.name}: records.jsonl, manifest.json, manifest.sig")
    key: Ed25519PublicKey | None = None
    try:
        pem = pem_source if isinstance(pem_source, bytes) else Path(pem_source).read_bytes()
        key = public_key_from_pem(pem)
        checks.add(True, f"Ed25519 key_id {key_id_of(key)}")
    except (AuditError, OSError) as exc:
        checks.add(False, str(exc), "an Ed25519 PEM public key", type(exc).__name__)
    manifest_bytes = files.read_small("manifest.json")
    signature = files.read_small("manifest.sig").decode("ascii", errors="replace").strip()
    raw_manifest: Any = None
    try:
        raw_manifest = json.loads(manifest_bytes)
    except ValueError:
        pass
    claimed_id = raw_manifest.get("key_id") if isinstance(raw_manifest, dict) else None
    if key is None:
        checks.add(False, "not run: no usable public key (check 2)")
    elif verify_signature(key, signature, manifest_bytes):
        checks.add(True, "Ed25519 signature over manifest.json verifies")
    else:
        checks.add(False, "manifest.json is not signed by this key, or was changed after signing",
                   f"a signature by key_id {key_id_of(key)}",
                   f"an invalid signature (manifest names key_id {claimed_id!s})")
    try:
        manifest = parse_manifest(raw_manifest)
    except ValueError as exc:
        expected, _, found = str(exc).partition(", found ")
        checks.add(False, f"manifest: {exc}", expected, found)
        checks.skip_rest("the manifest is unusable (check 4)")
        return ExportReport(path=str(path), stream=None, checks=tuple(checks.results))
    if key is not None and manifest.key_id != key_id_of(key):
        # Still a usable manifest: the content checks below run, to show what else is wrong.
        checks.add(False, "the manifest names another signing key than the one given",
                   f"key_id {key_id_of(key)}", f"key_id {manifest.key_id}")
    else:
        checks.add(True, f"{EXPORT_TYPE} for stream {manifest.stream!r}, {manifest.count} records")
    with files.open("records.jsonl") as handle:
        scan = scan_records(handle, manifest, key, files.limits.max_line_bytes)
    _content_checks(checks, manifest, scan, key)
    return ExportReport(path=str(path), stream=manifest.stream, checks=tuple(checks.results),
                        count=scan.count, first_seq=scan.first_seq, last_seq=scan.last_seq,
                        key_id=manifest.key_id, extra={"period": manifest.period})


def _content_checks(checks: _Checks, m: Manifest, scan: RecordScan, key: Ed25519PublicKey | None) -> None:
    digest_ok = scan.sha256 == m.records_sha256 and scan.size == m.records_bytes
    checks.add(digest_ok, "records.jsonl is byte-for-byte what was signed" if digest_ok else
               "records.jsonl was changed after export", f"sha256 {m.records_sha256} ({m.records_bytes} bytes)",
               f"sha256 {scan.sha256} ({scan.size} bytes)")
    checks.add(scan.count == m.count, f"{scan.count} records", f"{m.count} records", f"{scan.count} records")
    fail = scan.chain_failure
    checks.add(fail is None, "unbroken chain" if fail is None else fail.describe(),
               "" if fail is None else fail.expected, "" if fail is None else fail.found,
               None if fail is None else fail.seq)
    expected = (m.first_seq, m.last_seq, m.anchor_prev_hash, m.last_hash)
    found = (scan.first_seq, scan.last_seq, scan.anchor_prev_hash, scan.last_hash)
    range_ok = expected == found and scan.anchor_problem is None
    checks.add(range_ok, scan.anchor_problem or f"seq {m.first_seq}..{m.last_seq}",
               "first_seq, last_seq, anchor, last hash = " + ", ".join(map(str, expected)),
               scan.anchor_problem or ", ".join(map(str, found)))
    period = f"[{m.period['since'] or '-inf'}, {m.period['until'] or '+inf'})"
    checks.add(scan.period_problem is None, scan.period_problem or f"all ts in {period}",
               f"every ts in {period}", scan.period_problem or "", scan.period_seq)
    checks.add(scan.isolation_problem is None, scan.isolation_problem or f"only stream {m.stream!r}",
               f"only records of stream {m.stream!r}", scan.isolation_problem or "", scan.isolation_seq)
    if key is None:
        checks.add(False, "not run: no usable public key (check 2)")
    else:
        problem = scan.checkpoint_problem
        checks.add(problem is None, scan.checkpoint_detail if problem is None else problem,
                   "a valid signed checkpoint matching its record", problem or "")
