"""The export file format (version 2): one uncompressed tar, members in this order.

- ``records.jsonl``  -- the stream's records for the period, one canonical JSON object per line
  (``\\n``-terminated), in seq order, each with its ``prev_hash`` and ``hash``; a record whose
  body retention pruned has ``"data": {}`` and one more key, ``"pruned_at"``. Verification
  always runs on this file, whatever ``--format`` was asked for.
- ``records.csv`` or ``records.ocsf.jsonl`` -- only for ``--format csv`` / ``ocsf``: the same
  records for spreadsheets or a SIEM (``csv_format``, ``ocsf``). Their sha256 is in the signed
  manifest, and a verifier regenerates them from ``records.jsonl`` and compares.
- ``checkpoint``     -- the stream tree's C2SP signed note (tlog-checkpoint) the export is proven
  against, taken after the export signed the stream's head.
- ``proofs/<seq, 20 digits>.tlog-proof`` -- C2SP tlog-proof files (``proofs``): one for the
  first and the last exported record, or one per record (``proofs="all"``).
- ``manifest.json``  -- canonical JSON: stream, period, count, first/last seq, anchor, last hash,
  sha256 and size of every data member, the checkpoint, the tree's right edge before the first
  exported record (``tree_edge``) and the consistency proof from ``last_seq`` to the
  checkpoint's size (``consistency_proof``), the signing ``key_id``;
- ``manifest.sig``   -- base64 Ed25519 signature over the exact bytes of ``manifest.json``.

The range proof: fold ``tree_edge`` and the leaves of the exported records (``SHA-256(0x00 ||
record hash)``) into the root of the first ``last_seq`` leaves; the consistency proof takes that
root to the signed checkpoint's root. That proves every exported record is in the signed tree,
at its seq, in O(log n) bytes. An extracted directory holding the same files verifies like the tar.
"""

from __future__ import annotations

import json
import re
import tarfile
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

from appliance.audit.canonical import canonical_json, is_canonical_ts
from appliance.audit.record import AuditRecord

EXPORT_TYPE = "sovereign-audit-export/v2"
RECORDS_NAME = "records.jsonl"
CSV_NAME = "records.csv"
OCSF_NAME = "records.ocsf.jsonl"
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
CHECKPOINT_NAME = "checkpoint"
FORMAT_FILES: dict[str, str | None] = {"jsonl": None, "csv": CSV_NAME, "ocsf": OCSF_NAME}
PROOF_MODES = ("ends", "all")
PROOFS_DIR = "proofs/"
PROOF_SUFFIX = ".tlog-proof"
FIXED_NAMES = (RECORDS_NAME, CSV_NAME, OCSF_NAME, CHECKPOINT_NAME, MANIFEST_NAME, SIGNATURE_NAME)
REQUIRED_NAMES = (RECORDS_NAME, MANIFEST_NAME, SIGNATURE_NAME)
HASH_RULE = (
    "record hash = sha256 of the canonical JSON (keys sorted, no whitespace, UTF-8, no NaN) of the "
    "record without its 'hash' (and 'pruned_at') field; prev_hash of seq 1 = "
    "sha256('sovereign-audit-genesis:' + stream); a pruned record keeps its hash, its body is gone"
)
LEAF_RULE = ("RFC 9162 Merkle tree per stream: leaf seq-1 = sha256(0x00 || record hash bytes), "
             "node = sha256(0x01 || left || right)")
MANIFEST_FIELDS = frozenset({
    "type", "stream", "created", "period", "count", "pruned", "first_seq", "last_seq", "anchor_prev_hash",
    "last_hash", "records_file", "records_sha256", "records_bytes", "format", "hash_rule", "leaf_rule",
    "checkpoint", "tree_edge", "consistency_proof", "proofs", "key_id", "signature_algorithm",
})


def record_from_export(obj: Any) -> tuple[AuditRecord, str | None]:
    """A record line's object -> (record, pruned_at); ``ValueError`` names the first bad field."""
    pruned_at = None
    if isinstance(obj, dict) and "pruned_at" in obj:
        obj = dict(obj)
        pruned_at = obj.pop("pruned_at")
        if not isinstance(pruned_at, str) or not is_canonical_ts(pruned_at):
            raise ValueError(f"record pruned_at must be an RFC 3339 UTC timestamp, found {pruned_at!r}")
        if obj.get("data") != {}:
            raise ValueError("a pruned record's data must be {}, found a body")
    return AuditRecord.from_dict(obj), pruned_at


_ENCODE = json.JSONEncoder(ensure_ascii=False, allow_nan=False).encode
_PLAIN = re.compile(r'[^"\\\x00-\x1f]*')  # what the encoder leaves as it is between the quotes


def _s(value: str | None) -> str:
    if value is None:
        return "null"
    return f'"{value}"' if _PLAIN.fullmatch(value) else _ENCODE(value)


def record_line_parts(row: Any) -> tuple[str, str]:
    """The canonical export line of a database row, split where ``"hash"`` goes: ``prefix +
    suffix`` is the hashed body, ``prefix + '"hash":"<h>",' + suffix`` the line (no newline).
    Built from the stored (canonical) data text without parsing it; the caller checks the hash
    of the body, which also proves the data text was canonical."""
    actor, event_type, prev_hash, request_id, stream, tenant, ts = (
        row.actor, row.event_type, row.prev_hash, row.request_id, row.stream, row.tenant, row.ts)
    if _PLAIN.fullmatch(f"{actor}{event_type}{prev_hash}{request_id or ''}{stream}{tenant or ''}{ts}"):
        # the common case: no field needs an escape, so each is its text in quotes
        rid = "null" if request_id is None else f'"{request_id}"'
        ten = "null" if tenant is None else f'"{tenant}"'
        return (f'{{"actor":"{actor}","data":{row.data},"event_type":"{event_type}",',
                f'"prev_hash":"{prev_hash}","request_id":{rid},"seq":{int(row.seq)},"stream":"{stream}",'
                f'"tenant":{ten},"ts":"{ts}"}}')
    prefix = f'{{"actor":{_s(actor)},"data":{row.data},"event_type":{_s(event_type)},'
    suffix = (f'"prev_hash":{_s(prev_hash)},"request_id":{_s(request_id)},"seq":{int(row.seq)},'
              f'"stream":{_s(stream)},"tenant":{_s(tenant)},"ts":{_s(ts)}}}')
    return prefix, suffix


def canonical_record_line(record: AuditRecord, pruned_at: str | None) -> str:
    obj = record.to_dict()
    if pruned_at is not None:
        obj["pruned_at"] = pruned_at
    return canonical_json(obj)


def proof_name(seq: int) -> str:
    """Member name of a stream record's proof (zero-padded, so names sort by seq)."""
    return f"{PROOFS_DIR}{seq:020d}{PROOF_SUFFIX}"


def seq_of_proof(name: str) -> int | None:
    digits = name[len(PROOFS_DIR):-len(PROOF_SUFFIX)]
    if len(digits) != 20 or not digits.isdigit() or int(digits) < 1:
        return None
    return int(digits)


@dataclass(frozen=True)
class ExportLimits:
    """Sizes a verifier accepts before reading anything: an export is untrusted input."""

    max_records_bytes: int = 4 * 1024**3
    max_manifest_bytes: int = 1024**2
    max_signature_bytes: int = 1024
    max_line_bytes: int = 1024**2
    max_checkpoint_bytes: int = 64 * 1024
    max_proof_bytes: int = 64 * 1024
    max_proofs: int = 10_000_000

    def limit_for(self, name: str) -> int:
        if name.startswith(PROOFS_DIR):
            return self.max_proof_bytes
        return {RECORDS_NAME: self.max_records_bytes, CSV_NAME: 4 * self.max_records_bytes,
                OCSF_NAME: 4 * self.max_records_bytes, MANIFEST_NAME: self.max_manifest_bytes,
                SIGNATURE_NAME: self.max_signature_bytes, CHECKPOINT_NAME: self.max_checkpoint_bytes}[name]


class ExportReadError(Exception):
    """The export's container is unusable; the message says expected vs found."""


class ExportFiles:
    """The members of an export, opened from a tar file or an extracted directory.

    ``names``: the fixed members present; ``proof_seqs``: the seq of every proof file, in seq
    order (the order they must have in the tar), read with ``read_proof(i)``. Proof files are
    indexed in three integer arrays (24 bytes each), so a million of them cost ~24 MB."""

    def __init__(self, path: Path, limits: ExportLimits) -> None:
        self.path = path
        self.limits = limits
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        self.names: set[str] = set()
        self.proof_seqs = array("q")
        self._proof_at = array("q")  # tar: data offset of each proof file
        self._proof_size = array("q")
        if path.is_dir():
            self._open_dir()
        elif path.is_file():
            self._open_tar()
        else:
            raise ExportReadError(f"an export tar or directory at {path}, found nothing")
        missing = [n for n in REQUIRED_NAMES if n not in self.names]
        if missing:
            self.close()
            raise ExportReadError(f"members {list(REQUIRED_NAMES)}, found {sorted(self.names)} (missing {missing})")

    def _add(self, name: str, size: int, offset: int = -1) -> None:
        if name in FIXED_NAMES:
            if name in self.names:
                raise ExportReadError(f"each member once, found {name!r} twice")
            self.names.add(name)
        elif name.startswith(PROOFS_DIR) and name.endswith(PROOF_SUFFIX):
            seq = seq_of_proof(name)
            if seq is None:
                raise ExportReadError(f"proof files named proofs/<seq, 20 digits>{PROOF_SUFFIX}, found {name!r}")
            if self.proof_seqs and seq <= self.proof_seqs[-1]:
                raise ExportReadError(f"proof files once each in seq order, found {name!r} after "
                                      f"seq {self.proof_seqs[-1]}")
            if len(self.proof_seqs) >= self.limits.max_proofs:
                raise ExportReadError(f"at most {self.limits.max_proofs} proof files, found more")
            self.proof_seqs.append(seq)
            self._proof_at.append(offset)
            self._proof_size.append(size)
        else:
            raise ExportReadError(f"only the members of an export ({', '.join(FIXED_NAMES)}, "
                                  f"{PROOFS_DIR}*{PROOF_SUFFIX}), found {name!r}")
        if size > self.limits.limit_for(name):
            raise ExportReadError(f"{name} of at most {self.limits.limit_for(name)} bytes, found {size}")

    def _open_dir(self) -> None:
        for member in sorted(self.path.iterdir()):
            if member.name == PROOFS_DIR.rstrip("/") and member.is_dir() and not member.is_symlink():
                for proof in sorted(member.iterdir()):
                    if not proof.is_file() or proof.is_symlink():
                        raise ExportReadError(f"regular proof files in {member}, found {proof.name!r}")
                    self._add(f"{PROOFS_DIR}{proof.name}", proof.stat().st_size)
                continue
            if not member.is_file() or member.is_symlink():
                raise ExportReadError(f"regular files in {self.path}, found {member.name!r}")
            self._add(member.name, member.stat().st_size)

    def _open_tar(self) -> None:
        try:
            self._tar = tarfile.open(self.path, "r:")
            while (info := self._tar.next()) is not None:
                # tarfile keeps every member it reads (TarFile.members, not in the typing stubs);
                # a million proof files would be ~1 GB of TarInfo, the arrays above suffice
                cast(Any, self._tar).members.clear()
                if info.isdir() and info.name.rstrip("/") == PROOFS_DIR.rstrip("/"):
                    continue
                if not info.isreg():
                    raise ExportReadError(f"{info.name} as a regular file, found tar type {info.type!r}")
                self._add(info.name, info.size, info.offset_data)
                if info.name in FIXED_NAMES:
                    self._members[info.name] = info
        except (tarfile.TarError, OSError) as exc:
            self.close()
            raise ExportReadError(f"a readable tar file, found {type(exc).__name__}: {exc}") from None
        except ExportReadError:
            self.close()
            raise

    def open(self, name: str) -> IO[bytes]:
        if self._tar is None:
            return (self.path / name).open("rb")
        handle = self._tar.extractfile(self._members[name])
        if handle is None:  # pragma: no cover - regular members always have a file object
            raise ExportReadError(f"{name} readable, found no data")
        return handle

    def read_proof(self, i: int) -> bytes:
        """The ``i``-th proof file (within ``max_proof_bytes``, checked when it was listed)."""
        if self._tar is None:
            return (self.path / proof_name(self.proof_seqs[i])).read_bytes()
        fileobj = self._tar.fileobj
        assert fileobj is not None
        fileobj.seek(self._proof_at[i])
        return bytes(fileobj.read(self._proof_size[i]))

    def read_small(self, name: str) -> bytes:
        with self.open(name) as handle:
            return handle.read(self.limits.limit_for(name) + 1)

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
