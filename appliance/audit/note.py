"""C2SP signed notes, tlog-checkpoints and tlog-cosignatures (Ed25519), as published at c2sp.org.

A checkpoint body is three lines: the log's *origin*, the tree size in decimal, the root hash
in standard base64; each line ends with a newline. A signed note is the body, a blank line,
then one signature line per signer::

    — <key name> <base64(key ID (4 bytes) || signature)>

For an Ed25519 note signature, key ID = SHA-256(name || 0x0A || 0x01 || public key)[:4] and the
signature covers the body's bytes. A witness *cosignature* (tlog-cosignature, type 0x04) covers
``"cosignature/v1\\ntime <unix seconds>\\n" + body`` and its line carries
``key ID || timestamp (8 bytes, big-endian) || signature``. Verifier keys are written
``<name>+<key ID hex>+<base64(type || public key)>``, the form Go's ``note`` package reads.

The appliance's key name and every origin it signs are derived from its audit key, so two
appliances never sign the same origin: ``sovereign-audit/<key id[:16]>`` and
``sovereign-audit/<key id[:16]>/<tree>`` where tree is a tenant stream, ``_admin``, or ``_all``
(the appliance-wide tree).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIG_ED25519 = 0x01
SIG_COSIGNATURE = 0x04
EM_DASH = "\u2014"
_NAME = re.compile(r"^[^\s+\u2014]{1,256}$")
MAX_NOTE_BYTES = 64 * 1024


class NoteError(ValueError):
    """A note, checkpoint or key that is malformed: says what was expected and found."""


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(name: str, public_key: Ed25519PublicKey, sig_type: int = SIG_ED25519) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([sig_type]) + _raw(public_key)).digest()[:4]


def verifier_key(name: str, public_key: Ed25519PublicKey, sig_type: int = SIG_ED25519) -> str:
    """``<name>+<key id hex>+<base64(type || key)>``."""
    if not _NAME.match(name):
        raise NoteError(f"key name must be 1-256 characters without spaces, '+' or '\u2014', found {name!r}")
    blob = base64.b64encode(bytes([sig_type]) + _raw(public_key)).decode()
    return f"{name}+{key_id(name, public_key, sig_type).hex()}+{blob}"


@dataclass(frozen=True)
class Verifier:
    name: str
    public_key: Ed25519PublicKey
    sig_type: int

    @property
    def id(self) -> bytes:
        return key_id(self.name, self.public_key, self.sig_type)

    def text(self) -> str:
        return verifier_key(self.name, self.public_key, self.sig_type)


def parse_verifier_key(text: str) -> Verifier:
    parts = text.strip().split("+", 2)
    if len(parts) != 3:
        raise NoteError(f"verifier key: expected <name>+<key id hex>+<base64 key>, found {text.strip()[:80]!r}")
    name, hex_id, blob = parts
    try:
        raw = base64.b64decode(blob, validate=True)
        wanted = bytes.fromhex(hex_id)
    except (binascii.Error, ValueError):
        raise NoteError("verifier key: expected hex key id and base64 key, found undecodable text") from None
    if len(raw) != 33 or raw[0] not in (SIG_ED25519, SIG_COSIGNATURE):
        raise NoteError(f"verifier key: expected an Ed25519 key (type 0x01 or 0x04, 32 bytes), found "
                        f"{len(raw)} bytes of type 0x{raw[0]:02x}" if raw else "verifier key: empty key")
    verifier = Verifier(name, Ed25519PublicKey.from_public_bytes(raw[1:]), raw[0])
    verifier_key(name, verifier.public_key, raw[0])  # validates the name
    if verifier.id != wanted:
        raise NoteError(f"verifier key {name}: key id {hex_id} does not match its key (expected {verifier.id.hex()})")
    return verifier


@dataclass(frozen=True)
class CheckpointBody:
    origin: str
    size: int
    root: bytes

    def text(self) -> str:
        return f"{self.origin}\n{self.size}\n{base64.b64encode(self.root).decode()}\n"

    @classmethod
    def parse(cls, body: str) -> CheckpointBody:
        lines = body.split("\n")
        if len(lines) < 4 or lines[-1] != "":
            raise NoteError(f"checkpoint: expected origin, size and root hash lines, found {len(lines) - 1} lines")
        origin, size_text, root_text = lines[0], lines[1], lines[2]
        if lines[3:-1]:
            raise NoteError(f"checkpoint: expected no extension lines, found {len(lines) - 4}")
        if not origin or any(c.isspace() for c in origin):
            raise NoteError(f"checkpoint origin: expected a non-empty name without spaces, found {origin!r}")
        if not size_text.isdigit() or (size_text != "0" and size_text.startswith("0")):
            raise NoteError(f"checkpoint size: expected a decimal number without leading zeros, found {size_text!r}")
        try:
            root = base64.b64decode(root_text, validate=True)
        except binascii.Error:
            raise NoteError(f"checkpoint root: expected standard base64, found {root_text[:60]!r}") from None
        if len(root) != 32:
            raise NoteError(f"checkpoint root: expected 32 bytes, found {len(root)}")
        return cls(origin, int(size_text), root)


@dataclass(frozen=True)
class NoteSignature:
    name: str
    blob: bytes  # key id || [timestamp] || signature

    def line(self) -> str:
        return f"{EM_DASH} {self.name} {base64.b64encode(self.blob).decode()}\n"

    @property
    def key_id(self) -> bytes:
        return self.blob[:4]


@dataclass(frozen=True)
class SignedNote:
    body: str
    signatures: tuple[NoteSignature, ...] = field(default_factory=tuple)

    def text(self) -> str:
        return self.body + "\n" + "".join(sig.line() for sig in self.signatures)

    def checkpoint(self) -> CheckpointBody:
        return CheckpointBody.parse(self.body)

    def with_signature(self, sig: NoteSignature) -> SignedNote:
        kept = tuple(s for s in self.signatures if (s.name, s.key_id) != (sig.name, sig.key_id))
        return SignedNote(self.body, (*kept, sig))

    @classmethod
    def parse(cls, text: str) -> SignedNote:
        if len(text.encode("utf-8", "surrogatepass")) > MAX_NOTE_BYTES:
            raise NoteError(f"signed note: expected at most {MAX_NOTE_BYTES} bytes, found more")
        body, sep, sigs = text.partition("\n\n")
        if not sep or not text.endswith("\n"):
            raise NoteError("signed note: expected a body, a blank line and signature lines, found no blank line")
        signatures = []
        for line in sigs[:-1].split("\n"):
            parts = line.split(" ")
            if len(parts) != 3 or parts[0] != EM_DASH:
                raise NoteError(f"signature line: expected '\u2014 <name> <base64>', found {line[:80]!r}")
            try:
                blob = base64.b64decode(parts[2], validate=True)
            except binascii.Error:
                raise NoteError(f"signature line of {parts[1]!r}: expected base64, found {parts[2][:40]!r}") from None
            if len(blob) < 5:
                raise NoteError(f"signature line of {parts[1]!r}: expected key id and signature, "
                                f"found {len(blob)} bytes")
            signatures.append(NoteSignature(parts[1], blob))
        if not signatures:
            raise NoteError("signed note: expected at least one signature line, found none")
        return cls(body + "\n", tuple(signatures))

    # -- verification ---------------------------------------------------------------------

    def signed_by(self, verifier: Verifier) -> bool:
        """True when a signature line of ``verifier`` verifies over this note."""
        for sig in self.signatures:
            if sig.name != verifier.name or sig.key_id != verifier.id:
                continue
            if verifier.sig_type == SIG_ED25519 and len(sig.blob) == 4 + 64:
                if _verify(verifier.public_key, sig.blob[4:], self.body.encode()):
                    return True
            elif verifier.sig_type == SIG_COSIGNATURE and len(sig.blob) == 4 + 8 + 64:
                (timestamp,) = struct.unpack(">Q", sig.blob[4:12])
                if _verify(verifier.public_key, sig.blob[12:], cosigned_message(self.body, timestamp)):
                    return True
        return False

    def cosignature_time(self, verifier: Verifier) -> int | None:
        for sig in self.signatures:
            if sig.name == verifier.name and sig.key_id == verifier.id and len(sig.blob) == 76:
                return int(struct.unpack(">Q", sig.blob[4:12])[0])
        return None


def _verify(public_key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        public_key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


def cosigned_message(body: str, timestamp: int) -> bytes:
    return f"cosignature/v1\ntime {timestamp}\n".encode() + body.encode()


class NoteSigner:
    """Signs note bodies (log key, type 0x01) or cosigns checkpoints (witness key, type 0x04)."""

    def __init__(self, name: str, private_key: Ed25519PrivateKey, sig_type: int = SIG_ED25519) -> None:
        self.verifier = Verifier(name, private_key.public_key(), sig_type)
        verifier_key(name, self.verifier.public_key, sig_type)  # validates the name
        self._private = private_key

    @property
    def name(self) -> str:
        return self.verifier.name

    def sign(self, body: str) -> NoteSignature:
        if self.verifier.sig_type != SIG_ED25519:
            raise NoteError("a cosigning key signs with cosign(), not sign()")
        return NoteSignature(self.name, self.verifier.id + self._private.sign(body.encode()))

    def cosign(self, body: str, timestamp: int) -> NoteSignature:
        if self.verifier.sig_type != SIG_COSIGNATURE:
            raise NoteError("a log key signs with sign(), not cosign()")
        sig = self._private.sign(cosigned_message(body, timestamp))
        return NoteSignature(self.name, self.verifier.id + struct.pack(">Q", timestamp) + sig)
