"""The audit signing key: an Ed25519 private key in a 0600 file, created on first use.

Checkpoints and export manifests are signed with it; compliance officers verify with the
public key alone (PEM, SubjectPublicKeyInfo), which can be exported and carried offline. The
``key_id`` is the SHA-256 of the raw 32-byte public key, hex: it is what records and messages
may name instead of the key.
"""

from __future__ import annotations

import base64
import os
import stat
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance.audit.canonical import sha256_hex
from appliance.audit.errors import AuditError


def key_id_of(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return sha256_hex(raw)


def public_key_from_pem(pem: bytes) -> Ed25519PublicKey:
    """Parse a PEM public key; ``AuditError`` unless it is an Ed25519 key."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise AuditError(f"audit public key: expected a PEM public key, found unparsable data ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise AuditError(f"audit public key: expected Ed25519, found {type(key).__name__}")
    return key


def verify_signature(public_key: Ed25519PublicKey, signature_b64: str, message: bytes) -> bool:
    try:
        signature = base64.b64decode(signature_b64, validate=True)
        public_key.verify(signature, message)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


class AuditKeys:
    """The signing key at ``path``. Created (0600, parent 0700) when absent and ``create`` is true.

    An existing key file readable by group or others is refused: the key would already have
    leaked, and signing with it would vouch for nothing.
    """

    def __init__(self, path: Path, *, create: bool = True) -> None:
        self.path = Path(path)
        if not self.path.exists():
            if not create:
                raise AuditError(f"audit signing key: expected a key file at {self.path}, found none")
            self._create()
        self._private = self._load()
        self.public_key = self._private.public_key()
        self.key_id = key_id_of(self.public_key)

    def _create(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd, tmp = tempfile.mkstemp(prefix=".audit-key-", dir=self.path.parent)  # mkstemp: mode 0600
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(pem)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(tmp, self.path)  # never replaces a key another process created meanwhile
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)

    def _load(self) -> Ed25519PrivateKey:
        mode = stat.S_IMODE(self.path.stat().st_mode)
        if mode & 0o077:
            raise AuditError(f"audit signing key {self.path}: expected mode 0600, found {mode:04o}")
        try:
            key = serialization.load_pem_private_key(self.path.read_bytes(), password=None)
        except (ValueError, TypeError):
            raise AuditError(
                f"audit signing key {self.path}: expected an unencrypted PEM private key, found unparsable data"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise AuditError(f"audit signing key {self.path}: expected Ed25519, found {type(key).__name__}")
        return key

    def sign(self, message: bytes) -> str:
        """Base64 Ed25519 signature over ``message``."""
        return base64.b64encode(self._private.sign(message)).decode("ascii")

    def public_key_pem(self) -> bytes:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def __repr__(self) -> str:  # never the key itself
        return f"AuditKeys(path={str(self.path)!r}, key_id={self.key_id[:16]}...)"
