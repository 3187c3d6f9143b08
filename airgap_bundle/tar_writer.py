"""A deterministic tar writer: same entries in, same bytes out.

Entries are regular files only, added in sorted order, with fixed mode/owner/mtime and the GNU
format (no pax headers, so no sub-second timestamps or host-specific records).
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path
from typing import BinaryIO

from .errors import BuildError
from .progress import NullProgress, ProgressSink

FILE_MODE = 0o644


class _HashingReader(io.RawIOBase):
    """Reads a file while hashing it, so what goes into the tar is what was signed."""

    def __init__(self, stream: BinaryIO, progress: ProgressSink) -> None:
        self._stream = stream
        self._progress = progress
        self.digest = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self.digest.update(data)
        self.count += len(data)
        self._progress.advance(len(data))
        return data


def _info(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = FILE_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


class DeterministicTar:
    """Context manager writing ``path``; callers add entries in sorted name order."""

    def __init__(self, stream: BinaryIO, mtime: int, progress: ProgressSink | None = None) -> None:
        self._tar = tarfile.open(fileobj=stream, mode="w", format=tarfile.GNU_FORMAT)
        self._mtime = mtime
        self._last = ""
        self._progress = progress or NullProgress()

    def __enter__(self) -> DeterministicTar:
        return self

    def __exit__(self, *exc: object) -> None:
        self._tar.close()

    def _order(self, name: str) -> None:
        if name <= self._last:
            raise BuildError(f"tar entries must be added in sorted order: {name!r} after {self._last!r}")
        self._last = name

    def add_bytes(self, name: str, data: bytes) -> None:
        self._order(name)
        self._tar.addfile(_info(name, len(data), self._mtime), io.BytesIO(data))

    def add_file(self, name: str, source: Path, length: int, sha256: str) -> None:
        """Stream ``source`` into the tar; fail if it no longer has the signed length and hash."""
        self._order(name)
        with open(source, "rb") as stream:
            reader = _HashingReader(stream, self._progress)
            try:
                self._tar.addfile(_info(name, length, self._mtime), reader)  # type: ignore[arg-type]
            except OSError as exc:  # tarfile raises on a short read
                raise BuildError(f"{source}: changed during the build: expected {length} bytes ({exc})") from exc
            extra = stream.read(1)
        if reader.count != length or extra or reader.digest.hexdigest() != sha256:
            raise BuildError(
                f"{source}: changed during the build: expected {length} bytes sha256 {sha256}, "
                f"found {reader.count}{'+' if extra else ''} bytes sha256 {reader.digest.hexdigest()}"
            )
