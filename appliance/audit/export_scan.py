"""Reading an export's contents: the manifest's schema, and one streaming pass over the records.

The pass gathers every fact the numbered checks in ``verify_export`` need (digest, count,
chain, range, period, isolation, the record a checkpoint names) without holding the records
in memory, so an export of any size within the limits verifies in constant memory.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import IO, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from appliance.audit.canonical import genesis_hash, is_canonical_ts
from appliance.audit.chain import ChainFailure, ChainWalker
from appliance.audit.checkpoint import Checkpoint
from appliance.audit.export_format import EXPORT_TYPE, MANIFEST_FIELDS, RECORDS_NAME
from appliance.audit.record import ADMIN_STREAM, AuditRecord

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Manifest:
    stream: str
    period: dict[str, str | None]
    count: int
    first_seq: int | None
    last_seq: int | None
    anchor_prev_hash: str | None
    last_hash: str | None
    records_sha256: str
    records_bytes: int
    checkpoint: Any
    key_id: str


def _want(cond: bool, expected: str, found: Any) -> None:
    if not cond:
        raise ValueError(f"{expected}, found {found!r}")


def _opt_int(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)


def parse_manifest(obj: Any) -> Manifest:
    """Validate the manifest's shape; ``ValueError("<expected>, found <found>")`` otherwise."""
    _want(isinstance(obj, dict), "a JSON object", type(obj).__name__)
    _want(set(obj) == MANIFEST_FIELDS, f"fields {sorted(MANIFEST_FIELDS)}", sorted(obj))
    _want(obj["type"] == EXPORT_TYPE, f"type {EXPORT_TYPE!r}", obj["type"])
    _want(obj["records_file"] == RECORDS_NAME, f"records_file {RECORDS_NAME!r}", obj["records_file"])
    _want(obj["signature_algorithm"] == "ed25519", "signature_algorithm 'ed25519'", obj["signature_algorithm"])
    _want(isinstance(obj["stream"], str) and bool(obj["stream"]), "a stream name", obj["stream"])
    period = obj["period"]
    _want(isinstance(period, dict) and set(period) == {"since", "until"}, "period {since, until}", period)
    for bound in ("since", "until"):
        value = period[bound]
        _want(value is None or (isinstance(value, str) and is_canonical_ts(value)), f"period.{bound} RFC 3339", value)
    for name in ("count", "first_seq", "last_seq", "records_bytes"):
        _want(_opt_int(obj[name]), f"{name} a non-negative integer", obj[name])
    _want(obj["count"] is not None and obj["records_bytes"] is not None, "count and records_bytes", None)
    for name in ("anchor_prev_hash", "last_hash"):
        _want(obj[name] is None or bool(_HEX64.match(str(obj[name]))), f"{name} 64 hex digits", obj[name])
    for name in ("records_sha256", "key_id"):
        _want(isinstance(obj[name], str) and bool(_HEX64.match(obj[name])), f"{name} 64 hex digits", obj[name])
    empty = obj["count"] == 0
    bounds = (obj["first_seq"], obj["last_seq"], obj["anchor_prev_hash"], obj["last_hash"])
    _want(all(v is None for v in bounds) if empty else all(v is not None for v in bounds),
          "first/last seq, anchor and last hash set exactly when count > 0", bounds)
    return Manifest(
        stream=obj["stream"], period=period, count=obj["count"], first_seq=obj["first_seq"],
        last_seq=obj["last_seq"], anchor_prev_hash=obj["anchor_prev_hash"], last_hash=obj["last_hash"],
        records_sha256=obj["records_sha256"], records_bytes=obj["records_bytes"],
        checkpoint=obj["checkpoint"], key_id=obj["key_id"],
    )


@dataclass
class RecordScan:
    sha256: str = ""
    size: int = 0
    count: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    anchor_prev_hash: str | None = None
    last_hash: str | None = None
    chain_failure: ChainFailure | None = None
    anchor_problem: str | None = None
    period_problem: str | None = None
    period_seq: int | None = None
    isolation_problem: str | None = None
    isolation_seq: int | None = None
    checkpoint_problem: str | None = None
    checkpoint_detail: str = ""
    hashes_at: dict[int, str] = field(default_factory=dict)


def scan_records(handle: IO[bytes], m: Manifest, key: Ed25519PublicKey | None, max_line: int) -> RecordScan:
    scan = RecordScan()
    digest = hashlib.sha256()
    checkpoint = _parse_checkpoint(m, scan)
    walker = ChainWalker(m.stream, anchor_prev_hash=m.anchor_prev_hash or genesis_hash(m.stream),
                         first_seq=m.first_seq or 1, public_key=None)
    since, until = m.period["since"], m.period["until"]
    while line := handle.readline(max_line + 1):
        digest.update(line)
        scan.size += len(line)
        scan.count += 1
        try:
            if len(line) > max_line:
                raise ValueError(f"a line of at most {max_line} bytes")
            record = AuditRecord.from_dict(json.loads(line))
        except ValueError as exc:
            if scan.chain_failure is None and not walker.broken:
                scan.chain_failure = ChainFailure(m.stream, walker.next_seq, "record parse", "a JSON audit record",
                                                  f"line {scan.count}: {str(exc)[:200]}")
            continue
        walker.feed(record)
        if scan.first_seq is None:
            scan.first_seq, scan.anchor_prev_hash = record.seq, record.prev_hash
        scan.last_seq, scan.last_hash = record.seq, record.hash
        if checkpoint is not None and record.seq == checkpoint.seq:
            scan.hashes_at[record.seq] = record.hash
        if scan.period_problem is None and not (
            (since is None or record.ts >= since) and (until is None or record.ts < until)
        ):
            scan.period_problem, scan.period_seq = f"seq {record.seq} has ts {record.ts}", record.seq
        foreign_tenant = m.stream != ADMIN_STREAM and record.tenant not in (None, m.stream)
        if scan.isolation_problem is None and (record.stream != m.stream or foreign_tenant):
            scan.isolation_problem = f"seq {record.seq} of stream {record.stream!r}, tenant {record.tenant!r}"
            scan.isolation_seq = record.seq
    scan.sha256 = digest.hexdigest()
    scan.chain_failure = scan.chain_failure or walker.finish(require_checkpoints_covered=False)
    if scan.first_seq == 1 and scan.anchor_prev_hash != genesis_hash(m.stream):
        scan.anchor_problem = (f"seq 1 must anchor at genesis {genesis_hash(m.stream)}, "
                               f"found {scan.anchor_prev_hash}")
    _check_checkpoint(checkpoint, m, key, scan)
    return scan


def _parse_checkpoint(m: Manifest, scan: RecordScan) -> Checkpoint | None:
    if m.checkpoint is None:
        return None
    try:
        return Checkpoint.from_dict(m.checkpoint)
    except ValueError as exc:
        scan.checkpoint_problem = str(exc)
        return None


def _check_checkpoint(cp: Checkpoint | None, m: Manifest, key: Ed25519PublicKey | None, scan: RecordScan) -> None:
    if scan.checkpoint_problem is not None or key is None:
        return
    if cp is None:
        scan.checkpoint_detail = ("no checkpoint names a seq inside this export: the records are vouched for by "
                                  "the manifest signature alone")
        return
    problem = cp.signature_problem(key)
    if problem is None and cp.stream != m.stream:
        problem = f"checkpoint of stream {cp.stream!r}"
    if problem is None and not (m.first_seq is not None and m.first_seq <= cp.seq <= (m.last_seq or 0)):
        problem = f"checkpoint seq {cp.seq} outside the export's seq {m.first_seq}..{m.last_seq}"
    if problem is None and scan.hashes_at.get(cp.seq) != cp.hash:
        problem = f"record seq {cp.seq} has hash {scan.hashes_at.get(cp.seq)}, checkpoint signed {cp.hash}"
    scan.checkpoint_problem = problem
    scan.checkpoint_detail = f"signed checkpoint at seq {cp.seq} ({cp.ts}) matches"
