"""Reading an export's contents: the manifest's schema, and one streaming pass over the records.

The pass gathers every fact the numbered checks in ``verify_export`` need (digest, count,
chain, range, period, isolation, the range proof's root, the regenerated CSV/OCSF digest, each
tlog-proof file checked against its record as it goes by) without holding the records in
memory, so an export of any size within the limits verifies in constant memory.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

from appliance.audit.canonical import genesis_hash, is_canonical_ts
from appliance.audit.chain import ChainFailure, ChainWalker
from appliance.audit.csv_format import CsvRenderer
from appliance.audit.export_format import (
    EXPORT_TYPE,
    FORMAT_FILES,
    MANIFEST_FIELDS,
    PROOF_MODES,
    RECORDS_NAME,
    proof_name,
    record_from_export,
)
from appliance.audit.merkle import Frontier, record_leaf, verify_inclusion
from appliance.audit.ocsf import ocsf_line
from appliance.audit.proofs import ProofError, TlogProof
from appliance.audit.record import ADMIN_STREAM, AuditRecord

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Manifest:
    stream: str
    period: dict[str, str | None]
    count: int
    pruned: int
    first_seq: int | None
    last_seq: int | None
    anchor_prev_hash: str | None
    last_hash: str | None
    records_sha256: str
    records_bytes: int
    fmt: dict[str, Any]
    checkpoint: Any
    tree_edge: list[str]
    consistency_proof: list[str]
    proofs: dict[str, Any]
    key_id: str


def _want(cond: bool, expected: str, found: Any) -> None:
    if not cond:
        raise ValueError(f"{expected}, found {found!r}")


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _opt_int(value: Any) -> bool:
    return value is None or _int(value)


def _hex_list(value: Any) -> bool:
    return isinstance(value, list) and len(value) <= 64 and all(isinstance(h, str) and _HEX64.match(h) for h in value)


def parse_manifest(obj: Any) -> Manifest:
    """Validate the manifest's shape; ``ValueError("<expected>, found <found>")`` otherwise."""
    _want(isinstance(obj, dict), "a JSON object", type(obj).__name__)
    _want(obj.get("type") == EXPORT_TYPE, f"type {EXPORT_TYPE!r}", obj.get("type"))
    _want(set(obj) == MANIFEST_FIELDS, f"fields {sorted(MANIFEST_FIELDS)}", sorted(obj))
    _want(obj["records_file"] == RECORDS_NAME, f"records_file {RECORDS_NAME!r}", obj["records_file"])
    _want(obj["signature_algorithm"] == "ed25519", "signature_algorithm 'ed25519'", obj["signature_algorithm"])
    _want(isinstance(obj["stream"], str) and bool(obj["stream"]), "a stream name", obj["stream"])
    period = obj["period"]
    _want(isinstance(period, dict) and set(period) == {"since", "until"}, "period {since, until}", period)
    for bound in ("since", "until"):
        value = period[bound]
        _want(value is None or (isinstance(value, str) and is_canonical_ts(value)), f"period.{bound} RFC 3339", value)
    for name in ("count", "pruned", "records_bytes"):
        _want(_int(obj[name]), f"{name} a non-negative integer", obj[name])
    for name in ("first_seq", "last_seq"):
        _want(_opt_int(obj[name]), f"{name} a non-negative integer or null", obj[name])
    for name in ("anchor_prev_hash", "last_hash"):
        _want(obj[name] is None or bool(_HEX64.match(str(obj[name]))), f"{name} 64 hex digits", obj[name])
    for name in ("records_sha256", "key_id"):
        _want(isinstance(obj[name], str) and bool(_HEX64.match(obj[name])), f"{name} 64 hex digits", obj[name])
    empty = obj["count"] == 0
    bounds = (obj["first_seq"], obj["last_seq"], obj["anchor_prev_hash"], obj["last_hash"])
    _want(all(v is None for v in bounds) if empty else all(v is not None for v in bounds),
          "first/last seq, anchor and last hash set exactly when count > 0", bounds)
    fmt = obj["format"]
    _want(isinstance(fmt, dict) and set(fmt) == {"name", "file", "sha256", "bytes"}, "format {name, file, sha256, "
          "bytes}", fmt)
    _want(fmt["name"] in FORMAT_FILES and fmt["file"] == FORMAT_FILES[fmt["name"]],
          f"format name and file one of {FORMAT_FILES}", (fmt["name"], fmt["file"]))
    if fmt["file"] is None:
        _want(fmt["sha256"] is None and fmt["bytes"] is None, "no format digest for jsonl", fmt)
    else:
        _want(isinstance(fmt["sha256"], str) and bool(_HEX64.match(fmt["sha256"])) and _int(fmt["bytes"]),
              "format sha256 (64 hex digits) and bytes", fmt)
    _want(_hex_list(obj["tree_edge"]), "tree_edge: a list of 64-hex-digit hashes", obj["tree_edge"])
    _want(_hex_list(obj["consistency_proof"]), "consistency_proof: a list of 64-hex-digit hashes",
          obj["consistency_proof"])
    proofs = obj["proofs"]
    _want(isinstance(proofs, dict) and set(proofs) == {"mode", "count"} and proofs["mode"] in PROOF_MODES
          and _int(proofs["count"]), f"proofs {{mode: one of {list(PROOF_MODES)}, count}}", proofs)
    return Manifest(
        stream=obj["stream"], period=period, count=obj["count"], pruned=obj["pruned"],
        first_seq=obj["first_seq"],
        last_seq=obj["last_seq"], anchor_prev_hash=obj["anchor_prev_hash"], last_hash=obj["last_hash"],
        records_sha256=obj["records_sha256"], records_bytes=obj["records_bytes"], fmt=fmt,
        checkpoint=obj["checkpoint"], tree_edge=obj["tree_edge"], consistency_proof=obj["consistency_proof"],
        proofs=proofs, key_id=obj["key_id"],
    )


@dataclass(frozen=True)
class SignedHead:
    """The checkpoint the export is proven against (already checked by ``verify_export``)."""

    size: int
    root: bytes
    note: str


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
    range_root: bytes | None = None
    range_problem: str | None = None
    proof_problem: str | None = None
    proof_seq: int | None = None
    proofs_checked: int = 0
    alt_sha256: str | None = None
    alt_size: int = 0
    hash_at_seq: int | None = None  # a version 1 checkpoint's seq: the record hash there
    hash_at: str | None = None


class _ProofCursor:
    """Walks the export's proof files alongside the records (both in seq order)."""

    def __init__(self, proofs: Sequence[int], read: Callable[[int], bytes], head: SignedHead | None,
                 scan: RecordScan) -> None:
        self._iter: Iterator[tuple[int, int]] = ((seq, i) for i, seq in enumerate(proofs))
        self._next = next(self._iter, None)
        self.read, self.head, self.scan = read, head, scan

    def _fail(self, seq: int, problem: str) -> None:
        if self.scan.proof_problem is None:
            self.scan.proof_problem, self.scan.proof_seq = problem, seq

    def feed(self, record: AuditRecord, line: bytes) -> None:
        while self._next is not None and self._next[0] < record.seq:
            self._fail(self._next[0], f"a proof file for an exported record, found one for seq {self._next[0]}")
            self._next = next(self._iter, None)
        if self._next is None or self._next[0] != record.seq:
            return
        name, index = proof_name(record.seq), self._next[1]
        self._next = next(self._iter, None)
        self.scan.proofs_checked += 1
        if self.head is None:
            self._fail(record.seq, "a signed checkpoint to check proof files against, found none")
            return
        try:
            proof = TlogProof.parse(self.read(index).decode("utf-8"))
        except (ProofError, UnicodeDecodeError) as exc:
            self._fail(record.seq, f"{name}: {exc}")
            return
        if proof.note != self.head.note:
            self._fail(record.seq, f"{name}: the export's checkpoint, found another checkpoint note")
        elif proof.extra != line.rstrip(b"\n"):
            self._fail(record.seq, f"{name}: the exported record seq {record.seq} as its extra data, found other data")
        elif proof.index != record.seq - 1:
            self._fail(record.seq, f"{name}: index {record.seq - 1}, found {proof.index}")
        elif not verify_inclusion(record_leaf(record.hash), proof.index, self.head.size, proof.path,
                                  self.head.root):
            self._fail(record.seq, f"{name}: an inclusion path to the signed root, found one that does not lead there")

    def finish(self) -> None:
        for seq, _ in [*([self._next] if self._next is not None else []), *self._iter]:
            self._fail(seq, f"a proof file for an exported record, found one for seq {seq}")


def _range_frontier(m: Manifest, scan: RecordScan) -> Frontier | None:
    if m.first_seq is None:
        return None
    try:
        return Frontier(m.first_seq - 1, [bytes.fromhex(h) for h in m.tree_edge])
    except ValueError as exc:
        scan.range_problem = f"tree_edge: {exc}"
        return None


def scan_records(handle: IO[bytes], m: Manifest, max_line: int, head: SignedHead | None,
                 proofs: Sequence[int], read: Callable[[int], bytes], *, hash_at_seq: int | None = None) -> RecordScan:
    scan = RecordScan(hash_at_seq=hash_at_seq)
    digest = hashlib.sha256()
    first_seq = m.first_seq or 1
    edge = Frontier(first_seq - 1, [b"\0" * 32] * bin(first_seq - 1).count("1"))  # the walker's own, unused
    walker = ChainWalker(m.stream, anchor_prev_hash=m.anchor_prev_hash or genesis_hash(m.stream),
                         first_seq=first_seq, public_key=None, frontier=edge)
    frontier = _range_frontier(m, scan)
    cursor = _ProofCursor(proofs, read, head, scan)
    alt = hashlib.sha256() if m.fmt["file"] is not None else None
    renderer = CsvRenderer() if m.fmt["name"] == "csv" else None
    if alt is not None and renderer is not None:
        header = renderer.header()
        alt.update(header)
        scan.alt_size += len(header)
    since, until = m.period["since"], m.period["until"]
    while line := handle.readline(max_line + 1):
        digest.update(line)
        scan.size += len(line)
        scan.count += 1
        try:
            if len(line) > max_line:
                raise ValueError(f"a line of at most {max_line} bytes")
            record, pruned_at = record_from_export(json.loads(line))
        except ValueError as exc:
            if scan.chain_failure is None and not walker.broken:
                scan.chain_failure = ChainFailure(m.stream, walker.next_seq, "record parse", "a JSON audit record",
                                                  f"line {scan.count}: {str(exc)[:200]}")
            continue
        walker.feed(record, pruned=pruned_at is not None)
        if frontier is not None:
            frontier.append(record_leaf(record.hash))
        cursor.feed(record, line)
        if alt is not None:
            rendered = renderer.row(record, pruned_at) if renderer is not None else ocsf_line(record, pruned_at)
            alt.update(rendered)
            scan.alt_size += len(rendered)
        if scan.first_seq is None:
            scan.first_seq, scan.anchor_prev_hash = record.seq, record.prev_hash
        scan.last_seq, scan.last_hash = record.seq, record.hash
        if record.seq == hash_at_seq:
            scan.hash_at = record.hash
        if scan.period_problem is None and not (
            (since is None or record.ts >= since) and (until is None or record.ts < until)
        ):
            scan.period_problem, scan.period_seq = f"seq {record.seq} has ts {record.ts}", record.seq
        foreign_tenant = m.stream != ADMIN_STREAM and record.tenant not in (None, m.stream)
        if scan.isolation_problem is None and (record.stream != m.stream or foreign_tenant):
            scan.isolation_problem = f"seq {record.seq} of stream {record.stream!r}, tenant {record.tenant!r}"
            scan.isolation_seq = record.seq
    cursor.finish()
    scan.sha256 = digest.hexdigest()
    scan.alt_sha256 = None if alt is None else alt.hexdigest()
    scan.chain_failure = scan.chain_failure or walker.finish(require_checkpoints_covered=False)
    if scan.first_seq == 1 and scan.anchor_prev_hash != genesis_hash(m.stream):
        scan.anchor_problem = (f"seq 1 must anchor at genesis {genesis_hash(m.stream)}, "
                               f"found {scan.anchor_prev_hash}")
    if frontier is not None:
        scan.range_root = frontier.root()
        if frontier.size != (m.last_seq or 0) and scan.range_problem is None:
            scan.range_problem = (f"the records to end at seq {m.last_seq}, found {frontier.size} leaves "
                                  f"from seq {m.first_seq}")
    return scan
