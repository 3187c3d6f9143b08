"""Signed checkpoints: a tree's size and Merkle root, as a C2SP tlog-checkpoint signed note.

Every tenant stream is its own tree (so a tenant's export carries its own checkpoint and
reveals nothing of another tenant's), ``_admin`` holds admin and installer events, and ``_all``
is the appliance-wide tree of every event in commit order: deleting a whole stream, with its
checkpoints, still breaks ``_all``.

The log's key name and origins derive from the audit key (see ``note``): a checkpoint signed
by another key, or for another tree, or for another appliance, never verifies here.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from appliance.audit.keys import AuditKeys, key_id_of
from appliance.audit.note import SIG_ED25519, CheckpointBody, NoteError, NoteSignature, SignedNote, Verifier

GLOBAL_TREE = "_all"
ORIGIN_PREFIX = "sovereign-audit"
_FIELDS = ("tree", "size", "root", "ts", "key_id", "note")


def log_key_name(public_key: Ed25519PublicKey) -> str:
    return f"{ORIGIN_PREFIX}/{key_id_of(public_key)[:16]}"


def origin_of(public_key: Ed25519PublicKey, tree: str) -> str:
    return f"{log_key_name(public_key)}/{tree}"


def log_verifier(public_key: Ed25519PublicKey) -> Verifier:
    return Verifier(log_key_name(public_key), public_key, SIG_ED25519)


@dataclass(frozen=True)
class Checkpoint:
    tree: str
    size: int
    root: str  # hex
    ts: str
    key_id: str
    note: str  # the signed note's exact text, cosignatures included when the log has them

    # Names the hash-chain code and exports use: a stream's checkpoint at seq == size.
    @property
    def stream(self) -> str:
        return self.tree

    @property
    def seq(self) -> int:
        return self.size

    def signed_note(self) -> SignedNote:
        return SignedNote.parse(self.note)

    def signature_problem(self, public_key: Ed25519PublicKey) -> str | None:
        """``None`` when the note is this tree's checkpoint, signed by ``public_key``."""
        expected_id = key_id_of(public_key)
        if self.key_id != expected_id:
            return f"signed by key_id {expected_id[:16]}..., found key_id {self.key_id[:16]}..."
        try:
            note = self.signed_note()
            body = note.checkpoint()
        except NoteError as exc:
            return f"a C2SP signed checkpoint, found {exc}"
        origin = origin_of(public_key, self.tree)
        if body.origin != origin:
            return f"origin {origin}, found origin {body.origin}"
        if (body.size, body.root.hex()) != (self.size, self.root):
            return (f"size {self.size} and root {self.root[:16]}... as stored, "
                    f"found {body.size} and {body.root.hex()[:16]}...")
        if not note.signed_by(log_verifier(public_key)):
            return "a valid Ed25519 note signature by the audit key, found none"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _FIELDS}

    @classmethod
    def from_dict(cls, obj: Any) -> Checkpoint:
        if not isinstance(obj, dict) or set(obj) != set(_FIELDS):
            found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"checkpoint fields: expected {sorted(_FIELDS)}, found {found}")
        if not isinstance(obj["size"], int) or isinstance(obj["size"], bool) or obj["size"] < 0:
            raise ValueError(f"checkpoint size must be a non-negative integer, found {obj['size']!r}")
        for name in ("tree", "root", "ts", "key_id", "note"):
            if not isinstance(obj[name], str):
                raise ValueError(f"checkpoint {name} must be a string, found {obj[name]!r}")
        return cls(**obj)

    @classmethod
    def from_row(cls, row: Any) -> Checkpoint:
        return cls(tree=row.tree, size=row.size, root=row.root, ts=row.ts, key_id=row.key_id, note=row.note)


def sign_checkpoint(keys: AuditKeys, *, tree: str, size: int, root: bytes, ts: str) -> Checkpoint:
    body = CheckpointBody(origin_of(keys.public_key, tree), size, root).text()
    signature = base64.b64decode(keys.sign(body.encode()))
    verifier = log_verifier(keys.public_key)
    note = SignedNote(body, (NoteSignature(verifier.name, verifier.id + signature),))
    return Checkpoint(tree=tree, size=size, root=root.hex(), ts=ts, key_id=keys.key_id, note=note.text())
