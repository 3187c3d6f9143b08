"""Offline signing keys: Ed25519 key generation, the root of trust, and root rotation.

Key directory layout (private files 0600, directories 0700)::

    KEYDIR/root.json            latest root metadata (public; hand it to admins out of band)
    KEYDIR/<N>.root.json        every root version, the chain a bundle carries
    KEYDIR/private/<role>-<keyid16>.pem   PKCS#8 Ed25519 private keys (unencrypted, 0600)
    KEYDIR/private/retired/     keys replaced by a rotation

Private keys are matched to roles by key id, never by file name.
"""

from __future__ import annotations

import copy
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root

from .errors import KeyManagementError
from .fsutil import write_bytes_atomic

ROLES = ("root", "targets", "snapshot", "timestamp")
DEFAULT_THRESHOLDS = {"root": 2, "targets": 1, "snapshot": 1, "timestamp": 1}
DEFAULT_ROOT_EXPIRY = timedelta(days=365)
PRIVATE_DIR = "private"


@dataclass(frozen=True)
class RoleKeys:
    """How many keys a role gets and how many signatures it needs."""

    threshold: int
    count: int

    def __post_init__(self) -> None:
        if self.threshold < 1:
            raise ValueError(f"threshold must be >= 1, got {self.threshold}")
        if self.count < self.threshold:
            raise ValueError(f"key count must be >= threshold {self.threshold}, got {self.count}")


def _role_keys(thresholds: Mapping[str, int] | None, counts: Mapping[str, int] | None) -> dict[str, RoleKeys]:
    thresholds = dict(thresholds or {})
    counts = dict(counts or {})
    for name in list(thresholds) + list(counts):
        if name not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {name!r}")
    out = {}
    for role in ROLES:
        threshold = thresholds.get(role, DEFAULT_THRESHOLDS[role])
        out[role] = RoleKeys(threshold, counts.get(role, max(threshold, 3 if role == "root" else 1)))
    return out


def _write_private(keydir: Path, role: str, signer: CryptoSigner) -> None:
    private = keydir / PRIVATE_DIR
    private.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(private, 0o700)
    write_bytes_atomic(private / f"{role}-{signer.public_key.keyid[:16]}.pem", signer.private_bytes, mode=0o600)


def _utc_seconds(when: datetime) -> datetime:
    if when.tzinfo is None:
        raise ValueError("expiry must be timezone-aware (UTC)")
    return when.astimezone(UTC).replace(microsecond=0)


def write_root(keydir: Path, root_md: Metadata[Root]) -> None:
    """Write KEYDIR/<N>.root.json and KEYDIR/root.json (public)."""
    data = root_md.to_bytes()
    write_bytes_atomic(keydir / f"{root_md.signed.version}.root.json", data)
    write_bytes_atomic(keydir / "root.json", data)


def init_keys(
    keydir: Path,
    thresholds: dict[str, int] | None = None,
    counts: dict[str, int] | None = None,
    *,
    root_expires: datetime | None = None,
) -> Path:
    """Generate Ed25519 keys for the four TUF roles and the signed root v1; return KEYDIR/root.json.

    ``thresholds``/``counts`` default to root 2-of-3 and 1-of-1 for the other roles.
    Refuses to overwrite an existing key directory.
    """
    keydir = Path(keydir)
    plan = _role_keys(thresholds, counts)
    if (keydir / "root.json").exists() or (keydir / PRIVATE_DIR).exists():
        raise KeyManagementError(f"{keydir}: expected an empty key directory, found existing keys")
    keydir.mkdir(parents=True, exist_ok=True)
    expires = _utc_seconds(root_expires or datetime.now(UTC) + DEFAULT_ROOT_EXPIRY)
    root = Root(expires=expires, consistent_snapshot=False)
    signers: dict[str, list[CryptoSigner]] = {}
    for role, keys in plan.items():
        signers[role] = [CryptoSigner.generate_ed25519() for _ in range(keys.count)]
        for signer in signers[role]:
            root.add_key(signer.public_key, role)
            _write_private(keydir, role, signer)
        root.roles[role].threshold = keys.threshold
    root_md = Metadata(root)
    for signer in signers["root"]:
        root_md.sign(signer, append=True)
    write_root(keydir, root_md)
    return keydir / "root.json"


def load_root(keydir: Path) -> Metadata[Root]:
    path = Path(keydir) / "root.json"
    if not path.is_file():
        raise KeyManagementError(f"{path}: expected root metadata, found no such file (run 'keys init')")
    try:
        return Metadata[Root].from_bytes(path.read_bytes())
    except Exception as exc:
        raise KeyManagementError(f"{path}: expected root metadata, found unreadable data: {exc}") from exc


def _load_private(path: Path) -> CryptoSigner:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise KeyManagementError(f"{path}: expected a private key file with mode 0600, found {mode:04o}")
    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except Exception as exc:  # never echo the file content
        raise KeyManagementError(f"{path}: expected an unencrypted PEM private key, found unreadable data") from exc
    return CryptoSigner(key)  # type: ignore[arg-type]


def load_signers(keydir: Path, role: str, root: Root) -> list[CryptoSigner]:
    """Private keys in KEYDIR/private whose key id the root lists for ``role``; at least its threshold."""
    wanted = set(root.roles[role].keyids)
    found: dict[str, CryptoSigner] = {}
    private = Path(keydir) / PRIVATE_DIR
    for path in sorted(private.glob("*.pem")) if private.is_dir() else []:
        signer = _load_private(path)
        if signer.public_key.keyid in wanted:
            found[signer.public_key.keyid] = signer
    threshold = root.roles[role].threshold
    if len(found) < threshold:
        raise KeyManagementError(
            f"{private}: role {role!r} needs {threshold} signing key(s) listed in root v{root.version}, "
            f"found {len(found)}"
        )
    return [found[k] for k in sorted(found)]


def rotate_keys(keydir: Path, roles: list[str], *, root_expires: datetime | None = None) -> Path:
    """Replace every key of ``roles`` with fresh ones and sign root v(N+1) with old and new root keys.

    The old root's threshold of old root keys and the new root's threshold of new root keys sign
    the new version, so clients holding any earlier root can walk the chain forward.
    """
    keydir = Path(keydir)
    for role in roles:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    old_md = load_root(keydir)
    old_signers = load_signers(keydir, "root", old_md.signed)
    new = Root.from_dict(copy.deepcopy(old_md.signed.to_dict()))  # to_dict shares the keyid lists
    new.version += 1
    new.expires = _utc_seconds(root_expires or datetime.now(UTC) + DEFAULT_ROOT_EXPIRY)
    retired = keydir / PRIVATE_DIR / "retired"
    new_signers: dict[str, list[CryptoSigner]] = {}
    for role in roles:
        count = len(new.roles[role].keyids)
        for keyid in list(new.roles[role].keyids):
            new.revoke_key(keyid, role)
        new_signers[role] = [CryptoSigner.generate_ed25519() for _ in range(count)]
        for signer in new_signers[role]:
            new.add_key(signer.public_key, role)
    new_md = Metadata(new)
    root_signers = new_signers.get("root", [])
    for signer in old_signers + root_signers:
        new_md.sign(signer, append=True)
    for role, signers in new_signers.items():
        for path in sorted((keydir / PRIVATE_DIR).glob(f"{role}-*.pem")):
            retired.mkdir(mode=0o700, exist_ok=True)
            os.replace(path, retired / path.name)
        for signer in signers:
            _write_private(keydir, role, signer)
    write_root(keydir, new_md)
    return keydir / "root.json"
