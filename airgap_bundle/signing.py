"""Assembling and signing the TUF metadata of one bundle (targets, snapshot, timestamp)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp

from .errors import KeyManagementError
from .hashing import CHUNK_FIELD, ChunkHashes
from .keys import ROLES, load_root, load_signers
from .report import TargetInfo


@dataclass(frozen=True)
class SignedMetadata:
    """Serialized metadata files keyed by their name under metadata/."""

    files: dict[str, bytes]
    root_version: int


def root_chain(keydir: Path) -> dict[str, bytes]:
    """metadata/<N>.root.json for N = 1..latest plus root.json; the chain must be contiguous."""
    latest = load_root(keydir)
    chain: dict[str, bytes] = {}
    for n in range(1, latest.signed.version + 1):
        path = keydir / f"{n}.root.json"
        if not path.is_file():
            raise KeyManagementError(f"{path}: expected root version {n} of the chain, found no such file")
        data = path.read_bytes()
        if Metadata[Root].from_bytes(data).signed.version != n:
            raise KeyManagementError(f"{path}: expected root version {n}, found another version")
        chain[f"{n}.root.json"] = data
    chain["root.json"] = chain[f"{latest.signed.version}.root.json"]
    return chain


def _sign(md: Metadata, signers: list) -> None:
    for signer in signers:
        md.sign(signer, append=True)


def _meta(data: bytes, version: int) -> MetaFile:
    return MetaFile(version=version, length=len(data), hashes={"sha256": hashlib.sha256(data).hexdigest()})


def check_signing_keys(keydir: Path) -> None:
    """Fail before any bulky work when a role lacks its threshold of private keys or the chain is broken."""
    root = load_root(keydir).signed
    root_chain(keydir)
    for role in ROLES:
        if role != "root":
            load_signers(keydir, role, root)


def _target_file(path: str, info: TargetInfo, chunks: ChunkHashes | None) -> TargetFile:
    custom = {"custom": {CHUNK_FIELD: chunks.to_custom()}} if chunks is not None else None
    return TargetFile(length=info.length, hashes={"sha256": info.sha256}, path=path, unrecognized_fields=custom)


def sign_metadata(
    keydir: Path, targets: dict[str, TargetInfo], *, expires: datetime, version: int,
    chunks: dict[str, ChunkHashes] | None = None,
) -> SignedMetadata:
    """targets.json, snapshot.json, timestamp.json at ``version``, plus the root chain.

    ``chunks`` adds the signed per-chunk sha256 of large targets (custom ``sha256_chunks``).
    """
    root_md = load_root(keydir)
    root = root_md.signed
    chain = root_chain(keydir)
    chunks = chunks or {}
    target_files = {path: _target_file(path, info, chunks.get(path)) for path, info in sorted(targets.items())}
    targets_md = Metadata(Targets(version=version, expires=expires, targets=target_files))
    _sign(targets_md, load_signers(keydir, "targets", root))
    targets_bytes = targets_md.to_bytes()

    snapshot_md = Metadata(Snapshot(version=version, expires=expires,
                                    meta={"targets.json": _meta(targets_bytes, version)}))
    _sign(snapshot_md, load_signers(keydir, "snapshot", root))
    snapshot_bytes = snapshot_md.to_bytes()

    timestamp_md = Metadata(Timestamp(version=version, expires=expires,
                                      snapshot_meta=_meta(snapshot_bytes, version)))
    _sign(timestamp_md, load_signers(keydir, "timestamp", root))
    files = dict(chain)
    files.update({"targets.json": targets_bytes, "snapshot.json": snapshot_bytes,
                  "timestamp.json": timestamp_md.to_bytes()})
    return SignedMetadata(files=files, root_version=root.version)
