"""Signed checkpoints: a stream's head ``(seq, hash)`` at a moment, signed with the audit key.

Each stream's head is signed on its own, so a tenant's export can carry its checkpoint without
revealing any other tenant's head. A checkpoint makes truncation detectable: a stream whose
records end before a checkpoint's seq, or whose record at that seq has another hash, fails.
The signed message is the canonical JSON of :meth:`Checkpoint.payload`, domain-separated by
its ``type`` so a checkpoint signature can never pass as a manifest signature or vice versa.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from appliance.audit.canonical import canonical_json
from appliance.audit.keys import AuditKeys, key_id_of, verify_signature

CHECKPOINT_TYPE = "sovereign-audit-checkpoint/v1"
_FIELDS = ("stream", "seq", "hash", "ts", "key_id", "signature")


@dataclass(frozen=True)
class Checkpoint:
    stream: str
    seq: int
    hash: str
    ts: str
    key_id: str
    signature: str

    def payload(self) -> dict[str, Any]:
        return {
            "type": CHECKPOINT_TYPE, "stream": self.stream, "seq": self.seq, "hash": self.hash,
            "ts": self.ts, "key_id": self.key_id,
        }

    def message(self) -> bytes:
        return canonical_json(self.payload()).encode("utf-8")

    def signature_problem(self, public_key: Ed25519PublicKey) -> str | None:
        """``None`` when the signature is good; otherwise what was expected and found."""
        expected_id = key_id_of(public_key)
        if self.key_id != expected_id:
            return f"signed by key_id {expected_id[:16]}..., found key_id {self.key_id[:16]}..."
        if not verify_signature(public_key, self.signature, self.message()):
            return "a valid Ed25519 signature over the checkpoint, found an invalid one"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _FIELDS}

    @classmethod
    def from_dict(cls, obj: Any) -> Checkpoint:
        if not isinstance(obj, dict) or set(obj) != set(_FIELDS):
            found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"checkpoint fields: expected {sorted(_FIELDS)}, found {found}")
        if not isinstance(obj["seq"], int) or isinstance(obj["seq"], bool):
            raise ValueError(f"checkpoint seq must be an integer, found {obj['seq']!r}")
        for name in ("stream", "hash", "ts", "key_id", "signature"):
            if not isinstance(obj[name], str):
                raise ValueError(f"checkpoint {name} must be a string, found {obj[name]!r}")
        return cls(**obj)

    @classmethod
    def from_row(cls, row: Any) -> Checkpoint:
        return cls(
            stream=row.stream, seq=row.seq, hash=row.hash, ts=row.ts, key_id=row.key_id, signature=row.signature
        )


def sign_checkpoint(keys: AuditKeys, *, stream: str, seq: int, hash: str, ts: str) -> Checkpoint:
    unsigned = Checkpoint(stream=stream, seq=seq, hash=hash, ts=ts, key_id=keys.key_id, signature="")
    return Checkpoint(
        stream=stream, seq=seq, hash=hash, ts=ts, key_id=keys.key_id, signature=keys.sign(unsigned.message())
    )
