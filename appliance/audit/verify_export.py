"""``verify_export``: check an export offline with nothing but its file and the public key.

Numbered checks, always in this order; every check runs when its inputs exist, so the report
shows everything wrong at once, and the first failure is the one to read first:

 1 export readable       the tar (or directory) holds only export members, the required ones, within limits
 2 public key            the given PEM is an Ed25519 public key
 3 manifest signature    manifest.sig verifies over manifest.json with that key
 4 manifest schema       manifest.json is a version 2 export manifest naming that key
 5 records digest        records.jsonl has the manifest's sha256 and size
 6 record count          records.jsonl holds the manifest's number of records
 7 record chain          the records form one unbroken chain from the anchor (chain.py checks)
 8 range and anchor      first/last seq, anchor and last hash are the manifest's; seq 1 anchors
                         at the stream's genesis hash
 9 period                every record's ts lies in [since, until)
10 stream isolation      every record belongs to the manifest's stream (and tenant)
11 checkpoint note       ``checkpoint`` is the manifest's C2SP signed note, of this stream's tree,
                         signed by the audit key's note verifier, covering the last record
12 range proof           the tree edge plus the records' leaves give the root at last_seq, and
                         the consistency proof takes it to the signed root: every exported record
                         is in the signed tree at its seq
13 proof files           the tlog-proof files are the ones the manifest promises (first and last
                         record, or every record), each naming its record and proving it in the
                         same checkpoint
14 format file           records.csv / records.ocsf.jsonl (when asked for) has the manifest's
                         sha256 and is exactly what these records render to

A version 1 export (archived before the Merkle trees) gets checks 1-10 and, as its 11th, its
version 1 signed checkpoint (``verify_export_v1``); the report says ``version: 1``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from appliance.audit.checkpoint import Checkpoint
from appliance.audit.errors import AuditError
from appliance.audit.export_format import CHECKPOINT_NAME, EXPORT_TYPE, ExportFiles, ExportLimits, ExportReadError
from appliance.audit.export_scan import Manifest, RecordScan, SignedHead, parse_manifest, scan_records
from appliance.audit.keys import key_id_of, public_key_from_pem, verify_signature
from appliance.audit.merkle import verify_consistency
from appliance.audit.reports import CheckResult, ExportReport
from appliance.audit.verify_export_v1 import (
    EXPORT_TYPE_V1,
    checkpoint_problem_v1,
    parse_manifest_v1,
    scan_hash_at,
    want_hash_at,
)

CHECK_NAMES = (
    "export readable", "public key", "manifest signature", "manifest schema", "records digest",
    "record count", "record chain", "range and anchor", "period", "stream isolation", "checkpoint note",
    "range proof", "proof files", "format file",
)


class _Checks:
    def __init__(self) -> None:
        self.results: list[CheckResult] = []

    def add(self, passed: bool, detail: str, expected: str = "", found: str = "", seq: int | None = None) -> None:
        number = len(self.results) + 1
        self.results.append(CheckResult(number, CHECK_NAMES[number - 1], passed, detail, expected, found, seq))

    def problem(self, problem: str | None, ok_detail: str, seq: int | None = None) -> None:
        """Add a check from a "<expected>, found <found>" problem (``None``: passed)."""
        if problem is None:
            self.add(True, ok_detail)
        else:
            expected, _, found = problem.partition(", found ")
            self.add(False, problem, expected, found, seq)

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
    checks.add(True, f"{path.name}: {', '.join(sorted(files.names))}, {len(files.proof_seqs)} proof files")
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
    version = 1 if isinstance(raw_manifest, dict) and raw_manifest.get("type") == EXPORT_TYPE_V1 else 2
    try:
        manifest = parse_manifest_v1(raw_manifest) if version == 1 else parse_manifest(raw_manifest)
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
        checks.add(True, f"{EXPORT_TYPE_V1 if version == 1 else EXPORT_TYPE} for stream {manifest.stream!r}, "
                         f"{manifest.count} records")
    if version == 1:
        return _verify_v1(path, files, manifest, key, checks)
    head, note_problem = _signed_head(files, manifest, key)
    with files.open("records.jsonl") as handle:
        scan = scan_records(handle, manifest, files.limits.max_line_bytes, head, files.proof_seqs,
                            files.read_proof)
    _content_checks(checks, manifest, scan)
    _proof_checks(checks, files, manifest, scan, key, head, note_problem)
    return ExportReport(path=str(path), stream=manifest.stream, checks=tuple(checks.results),
                        count=scan.count, first_seq=scan.first_seq, last_seq=scan.last_seq,
                        key_id=manifest.key_id, extra={"period": manifest.period, "format": manifest.fmt["name"],
                                                       "pruned": manifest.pruned, "version": 2})


def _verify_v1(path: Path, files: ExportFiles, m: Manifest, key: Ed25519PublicKey | None,
               checks: _Checks) -> ExportReport:
    """A version 1 export: its 11 checks (the 11th: its version 1 checkpoint); see verify_export_v1."""
    extra = [n for n in files.names if n not in ("records.jsonl", "manifest.json", "manifest.sig")]
    if extra or files.proof_seqs:
        checks.results[0] = CheckResult(1, CHECK_NAMES[0], False, "a version 1 export holds only records.jsonl, "
                                        "manifest.json and manifest.sig", "those three members",
                                        f"also {sorted(extra)} and {len(files.proof_seqs)} proof files")
    with files.open("records.jsonl") as handle:
        scan = scan_records(handle, m, files.limits.max_line_bytes, None, (), files.read_proof,
                            hash_at_seq=want_hash_at(m))
    _content_checks(checks, m, scan)
    if key is None:
        checks.results.append(CheckResult(11, "checkpoint", False, "not run: no usable public key (check 2)"))
    else:
        problem, detail = checkpoint_problem_v1(m.checkpoint, m, key, scan_hash_at(scan))
        expected, _, found = (problem or "").partition(", found ")
        checks.results.append(CheckResult(11, "checkpoint", problem is None, problem or detail,
                                          expected if problem else "", found if problem else ""))
    return ExportReport(path=str(path), stream=m.stream, checks=tuple(checks.results), count=scan.count,
                        first_seq=scan.first_seq, last_seq=scan.last_seq, key_id=m.key_id,
                        extra={"period": m.period, "format": "jsonl", "pruned": 0, "version": 1})


def _signed_head(files: ExportFiles, m: Manifest, key: Ed25519PublicKey | None) -> tuple[SignedHead | None, str | None]:
    """The checkpoint to prove against, or ``None`` and why not (``None`` too when none is needed)."""
    if key is None:
        return None, "not run: no usable public key (check 2)"
    if m.checkpoint is None:
        if CHECKPOINT_NAME in files.names:
            return None, "no checkpoint member when the manifest names none, found one"
        return None, None if m.count == 0 else f"a signed checkpoint for {m.count} records, found none"
    try:
        cp = Checkpoint.from_dict(m.checkpoint)
    except ValueError as exc:
        return None, f"manifest checkpoint: {exc}"
    if CHECKPOINT_NAME not in files.names:
        return None, f"the member {CHECKPOINT_NAME!r} (the signed note), found none"
    note = files.read_small(CHECKPOINT_NAME).decode("utf-8", errors="replace")
    if note != cp.note:
        return None, f"{CHECKPOINT_NAME} to be the manifest's checkpoint note, found another text"
    problem = cp.signature_problem(key)
    if problem is None and cp.tree != m.stream:
        problem = f"a checkpoint of stream {m.stream!r}, found one of {cp.tree!r}"
    if problem is None and m.last_seq is not None and cp.size < m.last_seq:
        problem = f"a checkpoint covering seq {m.last_seq}, found one of {cp.size} records"
    if problem is not None:
        return None, problem
    return SignedHead(cp.size, bytes.fromhex(cp.root), cp.note), None


def _content_checks(checks: _Checks, m: Manifest, scan: RecordScan) -> None:
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


def _proof_checks(checks: _Checks, files: ExportFiles, m: Manifest, scan: RecordScan,
                  key: Ed25519PublicKey | None, head: SignedHead | None, note_problem: str | None) -> None:
    if note_problem is not None and note_problem.startswith("not run"):
        checks.add(False, note_problem)
    else:
        checks.problem(note_problem, "no records, nothing to prove" if head is None else
                       f"C2SP checkpoint of {head.size} records signed by the audit key")
    # 12 range proof
    if head is None or scan.range_root is None:
        if m.count == 0 and scan.count == 0 and note_problem is None:
            checks.add(True, "no records, nothing to prove")
        else:
            checks.add(False, f"not run: {scan.range_problem or note_problem or 'no records to fold'}")
    else:
        proof = [bytes.fromhex(h) for h in m.consistency_proof]
        ok = scan.range_problem is None and verify_consistency(m.last_seq or 0, head.size, scan.range_root,
                                                               head.root, proof)
        checks.problem(None if ok else scan.range_problem or (
            f"the root of seq 1..{m.last_seq} consistent with the signed root of {head.size}, found root "
            f"{scan.range_root.hex()[:16]}... that the consistency proof does not take there"),
            f"seq {m.first_seq}..{m.last_seq} proven in the signed tree of {head.size} "
            f"({len(m.tree_edge)} edge + {len(proof)} proof hashes)")
    # 13 proof files
    wanted = _wanted_proofs(m)
    seqs = files.proof_seqs
    problem = scan.proof_problem
    if problem is None and (len(seqs) != m.proofs["count"] or not wanted(seqs)):
        problem = (f"{m.proofs['count']} proof files ({m.proofs['mode']}: "
                   f"{'first and last record' if m.proofs['mode'] == 'ends' else 'every record'}), "
                   f"found {len(seqs)}")
    if problem is None and key is None:
        checks.add(False, "not run: no usable public key (check 2)")
    else:
        checks.problem(problem, f"{scan.proofs_checked} tlog-proof files verify", scan.proof_seq)
    # 14 format file
    _format_check(checks, files, m, scan)


def _wanted_proofs(m: Manifest) -> Callable[[Sequence[int]], bool]:
    def check(seqs: Sequence[int]) -> bool:
        if m.first_seq is None or m.last_seq is None:
            return not seqs
        if m.proofs["mode"] == "ends":
            return list(seqs) == sorted({m.first_seq, m.last_seq})
        # in seq order and distinct (checked when listed): the right count from first_seq is every seq
        return len(seqs) == m.last_seq - m.first_seq + 1 and seqs[0] == m.first_seq and seqs[-1] == m.last_seq
    return check


def _format_check(checks: _Checks, files: ExportFiles, m: Manifest, scan: RecordScan) -> None:
    name = m.fmt["file"]
    others = [n for n in ("records.csv", "records.ocsf.jsonl") if n in files.names and n != name]
    if others:
        checks.add(False, f"only the format the manifest names ({m.fmt['name']}), found {others}",
                   f"format {m.fmt['name']}", ", ".join(others))
        return
    if name is None:
        checks.add(True, "jsonl only (no other format asked for)")
        return
    if name not in files.names:
        checks.add(False, f"the member {name}, found none", name, "none")
        return
    digest, size = hashlib.sha256(), 0
    with files.open(name) as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    signed = (m.fmt["sha256"], m.fmt["bytes"])
    if (digest.hexdigest(), size) != signed:
        checks.add(False, f"{name} was changed after export", f"sha256 {signed[0]} ({signed[1]} bytes)",
                   f"sha256 {digest.hexdigest()} ({size} bytes)")
    elif (scan.alt_sha256, scan.alt_size) != signed:
        checks.add(False, f"{name} is not what the signed manifest's records render to",
                   f"sha256 {scan.alt_sha256} ({scan.alt_size} bytes) rendered from records.jsonl",
                   f"sha256 {signed[0]} ({signed[1]} bytes)")
    else:
        checks.add(True, f"{name} is signed and is exactly what records.jsonl renders to")
