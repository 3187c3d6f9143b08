"""C2SP tlog-proof files: one record's inclusion in a signed checkpoint, verifiable offline.

The format (c2sp.org/tlog-proof, version 1) is text, one item per line::

    c2sp.org/tlog-proof@v1
    extra <base64 of the record's canonical JSON line, without its newline>
    index <zero-based leaf index>
    <base64 sibling hash, leaf level first>
    ...
    <empty line>
    <the checkpoint's signed note, verbatim>

The ``extra`` line is opaque to the format and not authenticated by it; here it carries the
record itself, so a proof file stands alone: the verifier recomputes the record's hash from
its canonical body, the leaf ``SHA-256(0x00 || record hash)`` from that, and checks the path
to the root of the checkpoint, whose note the audit key signed (``checkpoint.log_verifier``).
A leaf of a stream's tree has index ``seq - 1``; a leaf of ``_all`` its ``gidx``.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from appliance.audit.checkpoint import GLOBAL_TREE, log_verifier, origin_of
from appliance.audit.export_format import record_from_export
from appliance.audit.merkle import record_leaf, verify_inclusion
from appliance.audit.note import CheckpointBody, NoteError, SignedNote
from appliance.audit.record import AuditRecord

HEADER = "c2sp.org/tlog-proof@v1"
MAX_PROOF_BYTES = 64 * 1024
MAX_PATH_HASHES = 64


class ProofError(ValueError):
    """A tlog-proof that is malformed or does not prove what it claims: expected vs found."""


@dataclass(frozen=True)
class TlogProof:
    index: int
    path: tuple[bytes, ...]
    note: str  # the signed checkpoint note, verbatim
    extra: bytes | None = None

    def text(self) -> str:
        lines = [HEADER]
        if self.extra is not None:
            lines.append(f"extra {base64.b64encode(self.extra).decode()}")
        lines.append(f"index {self.index}")
        lines.extend(base64.b64encode(h).decode() for h in self.path)
        return "\n".join(lines) + "\n\n" + self.note

    @classmethod
    def parse(cls, text: str) -> TlogProof:
        if len(text.encode("utf-8", "surrogatepass")) > MAX_PROOF_BYTES:
            raise ProofError(f"a tlog-proof of at most {MAX_PROOF_BYTES} bytes, found more")
        head, sep, note = text.partition("\n\n")
        if not sep:
            raise ProofError("a tlog-proof: header, index and proof lines, an empty line, a checkpoint; "
                             "found no empty line")
        lines = head.split("\n")
        if lines[0] != HEADER:
            raise ProofError(f"first line {HEADER!r}, found {lines[0][:60]!r}")
        pos = 1
        extra = None
        if pos < len(lines) and lines[pos].startswith("extra "):
            extra = _b64(lines[pos][6:], "extra data")
            pos += 1
        if pos >= len(lines) or not lines[pos].startswith("index "):
            raise ProofError(f"an 'index N' line, found {lines[pos][:60] if pos < len(lines) else 'none'!r}")
        index_text = lines[pos][6:]
        if not index_text.isdigit() or (index_text != "0" and index_text.startswith("0")):
            raise ProofError(f"index as a decimal without leading zeros, found {index_text[:30]!r}")
        hashes = lines[pos + 1:]
        if len(hashes) > MAX_PATH_HASHES:
            raise ProofError(f"at most {MAX_PATH_HASHES} proof hashes, found {len(hashes)}")
        path = []
        for line in hashes:
            value = _b64(line, "proof hash")
            if len(value) != 32:
                raise ProofError(f"32-byte proof hashes, found {len(value)} bytes")
            path.append(value)
        return cls(int(index_text), tuple(path), note, extra)


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        raise ProofError(f"{what} in standard base64, found {text[:40]!r}") from None


@dataclass(frozen=True)
class ProvenRecord:
    """What a verified proof establishes: this record is leaf ``index`` of the signed tree."""

    record: AuditRecord
    pruned_at: str | None  # set: retention removed the body; the hash (and so the leaf) is what is proven
    tree: str
    index: int
    checkpoint: CheckpointBody


def verify_proof(text: str, public_key: Ed25519PublicKey, *, tree: str | None = None) -> ProvenRecord:
    """Check a proof built by ``record_proof``; ``ProofError`` says what was expected and found.

    ``tree``: the tree the proof must be for (a stream or ``_all``); any tree of this key otherwise.
    """
    proof = TlogProof.parse(text)
    try:
        note = SignedNote.parse(proof.note)
        body = note.checkpoint()
    except NoteError as exc:
        raise ProofError(f"a C2SP signed checkpoint after the proof, found {exc}") from None
    prefix = origin_of(public_key, "")
    if not body.origin.startswith(prefix):
        raise ProofError(f"a checkpoint of origin {prefix}<tree>, found {body.origin!r}")
    found_tree = body.origin[len(prefix):]
    if tree is not None and found_tree != tree:
        raise ProofError(f"a checkpoint of tree {tree!r}, found tree {found_tree!r}")
    if not note.signed_by(log_verifier(public_key)):
        raise ProofError("a checkpoint signed by the audit key, found no valid signature by it")
    if proof.extra is None:
        raise ProofError("the record in the 'extra' line, found none")
    try:
        record, pruned_at = record_from_export(json.loads(proof.extra))
    except ValueError as exc:
        raise ProofError(f"an audit record in the 'extra' line, found {str(exc)[:120]}") from None
    computed = record.compute_hash()
    if pruned_at is None and computed != record.hash:
        raise ProofError(f"record hash {computed} (of its canonical body), found {record.hash}")
    if found_tree != GLOBAL_TREE:
        if record.stream != found_tree or proof.index != record.seq - 1:
            raise ProofError(f"leaf {record.seq - 1} of tree {record.stream!r} (the record's seq {record.seq}), "
                             f"found index {proof.index} of tree {found_tree!r}")
    if not verify_inclusion(record_leaf(record.hash), proof.index, body.size, proof.path, body.root):
        raise ProofError(f"an inclusion path from leaf {proof.index} to the signed root of {body.size} leaves, "
                         "found a path that does not lead there")
    return ProvenRecord(record, pruned_at, found_tree, proof.index, body)


def record_proof(record_line: str, index: int, path: list[bytes], note: str) -> str:
    """The tlog-proof text for the record ``record_line`` (canonical JSON, no newline)."""
    return TlogProof(index, tuple(path), note, record_line.encode("utf-8")).text()
