"""The export file format: one uncompressed tar holding three members, nothing else.

- ``records.jsonl``  -- the stream's records for the period, one canonical JSON object per line
  (``\\n``-terminated), in seq order, each with its ``prev_hash`` and ``hash``;
- ``manifest.json``  -- canonical JSON: stream, period, count, first/last seq, the anchor
  ``prev_hash`` of the first record, the last hash, sha256 and size of ``records.jsonl``, the
  newest signed checkpoint naming a seq inside the export, and the signing ``key_id``;
- ``manifest.sig``   -- base64 Ed25519 signature over the exact bytes of ``manifest.json``.

Verifiable without this code: ``tar xf``, ``sha256sum records.jsonl``, and
``base64 -d manifest.sig > sig.bin && openssl pkeyutl -verify -pubin -inkey audit.pem -rawin
-in manifest.json -sigfile sig.bin``; the record hash rule is written into the manifest. An
extracted directory holding the same three files verifies like the tar.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

EXPORT_TYPE = "sovereign-audit-export/v1"
RECORDS_NAME = "records.jsonl"
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
MEMBER_NAMES = (RECORDS_NAME, MANIFEST_NAME, SIGNATURE_NAME)
HASH_RULE = (
    "record hash = sha256 of the canonical JSON (keys sorted, no whitespace, UTF-8, no NaN) of the "
    "record without its 'hash' field; prev_hash of seq 1 = sha256('sovereign-audit-genesis:' + stream)"
)
MANIFEST_FIELDS = frozenset({
    "type", "stream", "created", "period", "count", "first_seq", "last_seq", "anchor_prev_hash",
    "last_hash", "records_file", "records_sha256", "records_bytes", "hash_rule", "checkpoint", "key_id",
    "signature_algorithm",
})


@dataclass(frozen=True)
class ExportLimits:
    """Sizes a verifier accepts before reading anything: an export is untrusted input."""

    max_records_bytes: int = 4 * 1024**3
    max_manifest_bytes: int = 1024**2
    max_signature_bytes: int = 1024
    max_line_bytes: int = 1024**2

    def limit_for(self, name: str) -> int:
        return {RECORDS_NAME: self.max_records_bytes, MANIFEST_NAME: self.max_manifest_bytes,
                SIGNATURE_NAME: self.max_signature_bytes}[name]


class ExportReadError(Exception):
    """The export's container is unusable; the message says expected vs found."""


class ExportFiles:
    """The three members of an export, opened from a tar file or an extracted directory."""

    def __init__(self, path: Path, limits: ExportLimits) -> None:
        self.path = path
        self.limits = limits
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        if path.is_dir():
            self._open_dir()
        elif path.is_file():
            self._open_tar()
        else:
            raise ExportReadError(f"an export tar or directory at {path}, found nothing")

    def _open_dir(self) -> None:
        for name in MEMBER_NAMES:
            member = self.path / name
            if not member.is_file() or member.is_symlink():
                raise ExportReadError(f"a regular file {name} in {self.path}, found none")
            self._check_size(name, member.stat().st_size)

    def _open_tar(self) -> None:
        try:
            self._tar = tarfile.open(self.path, "r:")
            for count, info in enumerate(self._tar, start=1):
                if count > len(MEMBER_NAMES):
                    raise ExportReadError(f"exactly {len(MEMBER_NAMES)} members, found more")
                if info.name not in MEMBER_NAMES or info.name in self._members:
                    raise ExportReadError(f"members {list(MEMBER_NAMES)} once each, found {info.name!r}")
                if not info.isreg():
                    raise ExportReadError(f"{info.name} as a regular file, found tar type {info.type!r}")
                self._check_size(info.name, info.size)
                self._members[info.name] = info
        except (tarfile.TarError, OSError) as exc:
            self.close()
            raise ExportReadError(f"a readable tar file, found {type(exc).__name__}: {exc}") from None
        except ExportReadError:
            self.close()
            raise
        missing = [n for n in MEMBER_NAMES if n not in self._members]
        if missing:
            self.close()
            raise ExportReadError(f"members {list(MEMBER_NAMES)}, found {sorted(self._members)} (missing {missing})")

    def _check_size(self, name: str, size: int) -> None:
        if size > self.limits.limit_for(name):
            raise ExportReadError(f"{name} of at most {self.limits.limit_for(name)} bytes, found {size}")

    def open(self, name: str) -> IO[bytes]:
        if self._tar is None:
            return (self.path / name).open("rb")
        handle = self._tar.extractfile(self._members[name])
        if handle is None:  # pragma: no cover - regular members always have a file object
            raise ExportReadError(f"{name} readable, found no data")
        return handle

    def read_small(self, name: str) -> bytes:
        with self.open(name) as handle:
            return handle.read(self.limits.limit_for(name) + 1)

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
