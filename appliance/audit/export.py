"""``export_stream``: one tenant's records for a period, as a signed, self-proving tar.

Before anything is written, the whole stream is verified from genesis against its signed
checkpoints (an export never vouches for a broken chain) and its head is checkpointed. Then,
in one read transaction, the records up to that checkpoint are streamed into the tar (each
record's hash re-checked on the way, so nothing that changed meanwhile is vouched for), with
the range proof and tlog-proof files that tie them to the signed checkpoint (``export_format``).
Memory stays flat: no list of records, no query per record, nothing kept per tar member
(``proofs="all"`` looks up the stored subtrees of each record's path, cached across neighbours).

The tar is built in a temporary file beside ``out`` and moved into place in one step; an
existing ``out`` is never replaced unless ``overwrite`` is true.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Connection, select

from appliance.audit.canonical import canonical_json, normalize_ts, parse_ts, utc_now_ts
from appliance.audit.checkpoint import Checkpoint
from appliance.audit.checkpointing import latest_checkpoint
from appliance.audit.csv_format import CsvRenderer
from appliance.audit.errors import AuditError, AuditIntegrityError
from appliance.audit.export_format import (
    CHECKPOINT_NAME,
    EXPORT_TYPE,
    FORMAT_FILES,
    HASH_RULE,
    LEAF_RULE,
    MANIFEST_NAME,
    PROOF_MODES,
    RECORDS_NAME,
    SIGNATURE_NAME,
    canonical_record_line,
    proof_name,
    record_line_parts,
)
from appliance.audit.log import AuditLog
from appliance.audit.merkle import Frontier, consistency_proof, inclusion_proof, record_leaf, verify_consistency
from appliance.audit.ocsf import ocsf_line
from appliance.audit.proofs import record_proof
from appliance.audit.record import AuditRecord, validate_stream
from appliance.audit.schema import audit_events
from appliance.audit.treestore import DbNodes, load_frontier

_COLUMNS = ("stream", "seq", "ts", "event_type", "actor", "tenant", "request_id", "data", "prev_hash", "hash",
            "pruned_at")


def export_stream(
    log: AuditLog, stream: str, since: str | datetime | None, until: str | datetime | None, out: Path,
    *, overwrite: bool = False, fmt: str = "jsonl", proofs: str = "ends",
) -> Path:
    """Write ``stream``'s records with ``since <= ts < until`` to the tar ``out``; returns ``out``
    (``export_with_manifest`` also returns the signed manifest)."""
    export_with_manifest(log, stream, since, until, out, overwrite=overwrite, fmt=fmt, proofs=proofs)
    return Path(out)


def export_with_manifest(
    log: AuditLog, stream: str, since: str | datetime | None, until: str | datetime | None, out: Path,
    *, overwrite: bool = False, fmt: str = "jsonl", proofs: str = "ends",
) -> dict[str, Any]:
    """Write ``stream``'s records with ``since <= ts < until`` to the tar ``out``; returns its manifest.

    ``fmt``: ``jsonl`` (canonical records only), ``csv`` or ``ocsf`` (that file as well; the
    canonical ``records.jsonl`` is always included and is what verification runs on).
    ``proofs``: ``ends`` (tlog-proofs of the first and last record) or ``all`` (one per record).
    Raises ``AuditIntegrityError`` if the stream does not verify, ``AuditError`` otherwise.
    """
    validate_stream(stream)
    if fmt not in FORMAT_FILES:
        raise AuditError(f"export format: expected one of {sorted(FORMAT_FILES)}, found {fmt!r}")
    if proofs not in PROOF_MODES:
        raise AuditError(f"export proofs: expected one of {list(PROOF_MODES)}, found {proofs!r}")
    lower, upper = normalize_ts(since), normalize_ts(until)
    if lower is not None and upper is not None and lower >= upper:
        raise AuditError(f"export period: expected since < until, found {lower} >= {upper}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise AuditError(f"export target {out}: expected no existing file, found one (pass overwrite)")
    log.verify(stream).raise_for_failure()
    log.checkpoint(stream)

    out.parent.mkdir(parents=True, exist_ok=True)
    with log.engine.connect() as conn:
        if conn.dialect.name == "postgresql":  # one snapshot for both passes (SQLite's read transaction is one)
            conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            return _write_export(conn, log, stream, lower, upper, out, overwrite, fmt, proofs)


def _write_export(conn: Connection, log: AuditLog, stream: str, lower: str | None, upper: str | None, out: Path,
                  overwrite: bool, fmt: str, proofs: str) -> dict[str, Any]:
    cp = latest_checkpoint(conn, stream)
    job = _Export(conn, stream, lower, upper, cp, fmt)
    with tempfile.TemporaryFile(dir=out.parent) as records_file, tempfile.TemporaryFile(dir=out.parent) as alt_file:
        job.write_records(records_file, alt_file)
        manifest = job.manifest(log.keys.key_id, proofs)
        manifest_bytes = canonical_json(manifest).encode("utf-8")
        signature = log.keys.sign(manifest_bytes).encode("ascii")
        members: list[tuple[str, IO[bytes], int]] = [(RECORDS_NAME, records_file, job.records.size)]
        alt_name = FORMAT_FILES[fmt]
        if alt_name is not None:
            members.append((alt_name, alt_file, job.alt.size))
        if cp is not None:
            note = cp.note.encode("utf-8")
            members.append((CHECKPOINT_NAME, io.BytesIO(note), len(note)))
        for file in (records_file, alt_file):
            file.seek(0)
        tail = [(MANIFEST_NAME, io.BytesIO(manifest_bytes), len(manifest_bytes)),
                (SIGNATURE_NAME, io.BytesIO(signature), len(signature))]
        mtime = int(parse_ts(manifest["created"]).timestamp())
        _write_tar(out, overwrite, mtime, itertools.chain(members, job.proof_members(proofs), tail))
    return manifest


@dataclass
class _Digest:
    sha: Any = field(default_factory=hashlib.sha256)
    size: int = 0

    def write(self, sink: IO[bytes], data: bytes) -> None:
        sink.write(data)
        self.sha.update(data)
        self.size += len(data)


class _Export:
    """One export's pass over the stream, inside the caller's read transaction."""

    def __init__(self, conn: Connection, stream: str, lower: str | None, upper: str | None,
                 cp: Checkpoint | None, fmt: str) -> None:
        self.conn, self.stream, self.lower, self.upper, self.cp, self.fmt = conn, stream, lower, upper, cp, fmt
        self.records, self.alt = _Digest(), _Digest()
        self.count = self.pruned = 0
        self.first: tuple[int, str, str] | None = None  # seq, prev_hash, line
        self.last: tuple[int, str, str] | None = None  # seq, hash, line
        self.edge: list[bytes] = []
        self.consistency: list[bytes] = []

    def _rows(self) -> Iterator[Any]:
        ev = audit_events.c
        size = 0 if self.cp is None else self.cp.size
        stmt = (select(*(getattr(ev, name) for name in _COLUMNS))
                .where(ev.stream == self.stream, ev.seq <= size).order_by(ev.seq))
        if self.lower is not None:
            stmt = stmt.where(ev.ts >= self.lower)
        if self.upper is not None:
            stmt = stmt.where(ev.ts < self.upper)
        yield from self.conn.execute(stmt).yield_per(5000)

    def _line(self, row: Any) -> tuple[str, AuditRecord | None]:
        """The canonical line of ``row`` (no newline), its hash checked; the record when parsed."""
        if row.pruned_at is None:
            prefix, suffix = record_line_parts(row)
            if hashlib.sha256((prefix + suffix).encode("utf-8")).hexdigest() == row.hash:
                return f'{prefix}"hash":"{row.hash}",{suffix}', None
        record = AuditRecord.from_row(row)
        if row.pruned_at is None and record.compute_hash() != record.hash:
            raise AuditIntegrityError(record.seq, self.stream, f"hash {record.compute_hash()}",
                                      f"hash {record.hash} (changed while exporting)", check="hash")
        return canonical_record_line(record, row.pruned_at), record

    def write_records(self, sink: IO[bytes], alt_sink: IO[bytes]) -> None:
        renderer = CsvRenderer() if self.fmt == "csv" else None
        if renderer is not None:
            self.alt.write(alt_sink, renderer.header())
        frontier: Frontier | None = None
        prev: tuple[int, str] | None = None
        for row in self._rows():
            line, record = self._line(row)
            if prev is not None and (row.seq, row.prev_hash) != (prev[0] + 1, prev[1]):
                raise AuditIntegrityError(row.seq, self.stream, f"seq {prev[0] + 1} linked to {prev[1]}",
                                          f"seq {row.seq} linked to {row.prev_hash} (changed while exporting)",
                                          check="prev_hash")
            prev = (row.seq, row.hash)
            if frontier is None:
                frontier = load_frontier(self.conn, self.stream, row.seq - 1)
                self.edge = frontier.edge()
                self.first = (row.seq, row.prev_hash, line)
            frontier.append(record_leaf(row.hash))
            self.records.write(sink, line.encode("utf-8") + b"\n")
            if self.fmt != "jsonl":
                if record is None:
                    record = AuditRecord.from_row(row)
                if renderer is not None:
                    self.alt.write(alt_sink, renderer.row(record, row.pruned_at))
                else:
                    self.alt.write(alt_sink, ocsf_line(record, row.pruned_at))
            self.count += 1
            self.pruned += row.pruned_at is not None
            self.last = (row.seq, row.hash, line)
        sink.flush()
        alt_sink.flush()
        if frontier is not None and self.last is not None and self.cp is not None:
            self.consistency = consistency_proof(DbNodes(self.conn, self.stream), self.last[0], self.cp.size)
            if not verify_consistency(self.last[0], self.cp.size, frontier.root(), bytes.fromhex(self.cp.root),
                                      self.consistency):
                raise AuditIntegrityError(self.last[0], self.stream, f"the records up to seq {self.last[0]} in the "
                                          f"signed tree of {self.cp.size}", "a tree that is not consistent with "
                                          "them", check="tree")

    def manifest(self, key_id: str, proofs: str) -> dict[str, Any]:
        alt_name = FORMAT_FILES[self.fmt]
        first, last = self.first, self.last
        n_proofs = 0 if first is None or last is None else (
            self.count if proofs == "all" else len({first[0], last[0]}))
        return {
            "type": EXPORT_TYPE, "stream": self.stream, "created": utc_now_ts(),
            "period": {"since": self.lower, "until": self.upper}, "count": self.count, "pruned": self.pruned,
            "first_seq": None if first is None else first[0], "last_seq": None if last is None else last[0],
            "anchor_prev_hash": None if first is None else first[1], "last_hash": None if last is None else last[1],
            "records_file": RECORDS_NAME, "records_sha256": self.records.sha.hexdigest(),
            "records_bytes": self.records.size,
            "format": {"name": self.fmt, "file": alt_name,
                       "sha256": None if alt_name is None else self.alt.sha.hexdigest(),
                       "bytes": None if alt_name is None else self.alt.size},
            "hash_rule": HASH_RULE, "leaf_rule": LEAF_RULE,
            "checkpoint": None if self.cp is None else self.cp.to_dict(),
            "tree_edge": [h.hex() for h in self.edge],
            "consistency_proof": [h.hex() for h in self.consistency],
            "proofs": {"mode": proofs, "count": n_proofs},
            "key_id": key_id, "signature_algorithm": "ed25519",
        }

    def proof_members(self, proofs: str) -> Iterator[tuple[str, IO[bytes], int]]:
        if self.cp is None or self.first is None or self.last is None:
            return
        cp = self.cp
        nodes = _CachedNodes(DbNodes(self.conn, self.stream))

        def member(seq: int, line: str) -> tuple[str, IO[bytes], int]:
            text = record_proof(line, seq - 1, inclusion_proof(nodes, seq - 1, cp.size), cp.note).encode("utf-8")
            return proof_name(seq), io.BytesIO(text), len(text)

        if proofs == "ends":
            yield member(self.first[0], self.first[2])
            if self.last[0] != self.first[0]:
                yield member(self.last[0], self.last[2])
            return
        pending: tuple[int, str] | None = None
        for row in self._rows():  # one record behind, so the next leaf (a sibling) is known without a query
            nodes.cache[(0, row.seq - 1)] = record_leaf(row.hash)
            if pending is not None:
                yield member(*pending)
            pending = (row.seq, self._line(row)[0])
        if pending is not None:
            yield member(*pending)


class _CachedNodes:
    """Stored subtrees, remembered for consecutive proofs (which share most of their path)."""

    def __init__(self, source: DbNodes, limit: int = 1 << 16) -> None:
        self.source, self.limit = source, limit
        self.cache: dict[tuple[int, int], bytes] = {}

    def node(self, level: int, index: int) -> bytes:
        key = (level, index)
        found = self.cache.get(key)
        if found is None:
            if len(self.cache) >= self.limit:
                self.cache.clear()
            found = self.cache[key] = self.source.node(level, index)
        return found


def _write_tar(out: Path, overwrite: bool, mtime: int, members: Iterable[tuple[str, IO[bytes], int]]) -> None:
    """Write the members as one POSIX (pax) tar, streamed: nothing is kept per member, so a
    million proof files cost no memory (``tarfile`` remembers every member it writes)."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            written = 0
            for name, source, size in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = size, mtime, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
                handle.write(header)
                copied = 0
                while copied < size and (chunk := source.read(min(1 << 20, size - copied))):
                    handle.write(chunk)
                    copied += len(chunk)
                if copied != size:
                    raise AuditError(f"export member {name}: expected {size} bytes, found {copied}")
                handle.write(b"\0" * (-size % tarfile.BLOCKSIZE))
                written += len(header) + size + (-size % tarfile.BLOCKSIZE)
            end = 2 * tarfile.BLOCKSIZE  # two zero blocks, then zeros to a whole record, as tar writes
            handle.write(b"\0" * (end + (-(written + end) % tarfile.RECORDSIZE)))
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        if overwrite:
            os.replace(tmp, out)
        else:
            try:
                os.link(tmp, out)  # fails rather than replace a file that appeared meanwhile
            except FileExistsError:
                raise AuditError(f"export target {out}: expected no existing file, found one") from None
    finally:
        tmp.unlink(missing_ok=True)
