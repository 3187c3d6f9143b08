"""Reading an untrusted bundle tar: member table with structural checks, bounded reads by offset.

Member data is read with ``os.pread`` at the member's data offset, never through tarfile's
extraction, so each reader holds its own position and nothing is written to disk.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .fsutil import CHUNK_SIZE
from .layout import METADATA_DIR, TARGETS_DIR, Limits, is_known_metadata, path_problem


class StructureProblem(Exception):
    """Raised by ``scan_members``; carries the member name concerned and expected vs found."""

    def __init__(self, message: str, member: str = "") -> None:
        self.member = member
        super().__init__(message)


@dataclass(frozen=True)
class Member:
    name: str
    offset: int  # byte offset of the member's data in the tar
    size: int

    @property
    def padded_end(self) -> int:
        """Offset just past the zero padding that rounds the data up to a 512-byte block."""
        return self.offset + -(-self.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


_KIND = {
    tarfile.SYMTYPE: "symbolic link",
    tarfile.LNKTYPE: "hard link",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "fifo",
    tarfile.DIRTYPE: "directory",
    tarfile.CONTTYPE: "contiguous file",
}


def _kind(info: tarfile.TarInfo) -> str:
    if info.issparse():
        return "sparse file"
    return _KIND.get(info.type, f"type {info.type!r}")


END_OF_ARCHIVE = 2 * tarfile.BLOCKSIZE


def _check_zero(fd: int, start: int, end: int, what: str, member: str = "") -> None:
    done = start
    while done < end:
        chunk = os.pread(fd, min(CHUNK_SIZE, end - done), done)
        if not chunk:
            raise StructureProblem(f"expected {what} up to offset {end}, found the file ends at {done} (truncated)",
                                   member)
        if chunk.count(0) != len(chunk):
            raise StructureProblem(f"expected {what} at offsets {start}-{end}, found non-zero bytes (hidden data)",
                                   member)
        done += len(chunk)


def _check_end(fd: int, offset: int, size: int, limits: Limits) -> None:
    """After the last member: the two zero blocks of the end marker, then only zero padding.

    A file cut at a member boundary looks like a shorter valid archive to tarfile; the missing
    end marker gives it away. Non-zero bytes after the marker would be data nobody verifies, and
    a long tail (even of zeros) is refused before it is read.
    """
    if size - offset < END_OF_ARCHIVE:
        raise StructureProblem(
            f"expected a {END_OF_ARCHIVE}-byte end-of-archive marker at offset {offset}, found {size - offset} "
            "bytes (truncated)"
        )
    if size - offset > limits.max_trailing_bytes:
        raise StructureProblem(f"expected at most {limits.max_trailing_bytes} bytes of end-of-archive marker and "
                               f"padding after offset {offset}, found {size - offset} (trailing data)")
    _check_zero(fd, offset, size, "only zero padding after the last member (trailing data)")


class _HeaderReader:
    """The file object tarfile parses headers from; refuses any single read over ``limit`` bytes.

    tarfile reads a GNU long-name or pax header's whole data into memory: one claiming
    gigabytes would otherwise be an endless-data attack on the parser itself.
    """

    def __init__(self, stream: BinaryIO, limit: int) -> None:
        self._stream = stream
        self._limit = limit
        self.name = getattr(stream, "name", None)

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > self._limit:
            raise StructureProblem(f"expected tar header records of at most {self._limit} bytes, found a header "
                                   f"claiming {size if size >= 0 else 'all remaining'} bytes at offset "
                                   f"{self._stream.tell()}")
        return self._stream.read(size)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._stream.seek(offset, whence)

    def tell(self) -> int:
        return self._stream.tell()


def scan_members(bundle: Path, limits: Limits) -> dict[str, Member]:
    """Every member, validated: regular files only, safe unique names, data inside the file."""
    size = bundle.stat().st_size
    members: dict[str, Member] = {}
    try:
        with open(bundle, "rb") as raw, \
                tarfile.open(fileobj=_HeaderReader(raw, limits.max_header_bytes), mode="r:") as tar:  # type: ignore[call-overload]
            while True:
                info = tar.next()
                if info is None:
                    break
                name = info.name
                if len(members) >= limits.max_members:
                    raise StructureProblem(f"expected at most {limits.max_members} members, found more")
                if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or info.issparse():
                    raise StructureProblem(f"expected only regular files, found a {_kind(info)}", name)
                problem = path_problem(name, limits.max_path_length)
                if problem:
                    raise StructureProblem(f"expected a safe relative path, found {problem}", name)
                if name in members:
                    raise StructureProblem("expected unique member names, found a duplicate", name)
                if not (name.startswith(TARGETS_DIR) or is_known_metadata(name)):
                    raise StructureProblem(
                        f"expected {METADATA_DIR}<role>.json or {TARGETS_DIR}<path>, found an unknown member", name
                    )
                if name.startswith(METADATA_DIR) and info.size > limits.max_metadata_bytes:
                    raise StructureProblem(
                        f"expected metadata of at most {limits.max_metadata_bytes} bytes, found {info.size}", name)
                if info.offset_data + info.size > size:
                    raise StructureProblem(
                        f"expected {info.size} data bytes at offset {info.offset_data}, found a file of {size} bytes "
                        "(truncated)", name
                    )
                members[name] = Member(name, info.offset_data, info.size)
            end = tar.offset
    except tarfile.TarError as exc:
        raise StructureProblem(f"expected a readable uncompressed tar, found: {exc}") from exc
    fd = os.open(bundle, os.O_RDONLY)
    try:
        for member in members.values():
            _check_zero(fd, member.offset + member.size, member.padded_end, "zero padding after the data",
                        member.name)
        _check_end(fd, end, size, limits)
    finally:
        os.close(fd)
    return members


def bundle_digest(bundle: Path, members: dict[str, Member]) -> str:
    """sha256 (hex) of every byte of the bundle except the data of ``targets/`` members.

    Headers, metadata files, padding and the end marker are hashed here; target data is pinned
    by its signed hashes in targets.json (one of the hashed metadata files). So, for a bundle
    that passes verification, equal digests mean equal bundle bytes, at the cost of reading a
    few kilobytes instead of the whole file. It is not the ``sha256sum`` of the file.
    """
    digest = hashlib.sha256()
    skips = sorted((m.offset, m.offset + m.size) for m in members.values() if m.name.startswith(TARGETS_DIR))
    fd = os.open(bundle, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        for start, stop in [*skips, (size, size)]:
            while pos < start:
                chunk = os.pread(fd, min(CHUNK_SIZE, start - pos), pos)
                if not chunk:
                    raise StructureProblem(f"expected {size} bytes, found the file ends at {pos} (truncated)")
                digest.update(chunk)
                pos += len(chunk)
            pos = max(pos, stop)
    finally:
        os.close(fd)
    return digest.hexdigest()


def read_member(bundle: Path, member: Member, max_bytes: int) -> bytes:
    """The whole member, refusing anything larger than ``max_bytes``."""
    if member.size > max_bytes:
        raise StructureProblem(f"expected at most {max_bytes} bytes, found {member.size}", member.name)
    fd = os.open(bundle, os.O_RDONLY)
    try:
        data = os.pread(fd, member.size, member.offset)
    finally:
        os.close(fd)
    if len(data) != member.size:
        raise StructureProblem(f"expected {member.size} bytes, found {len(data)}", member.name)
    return data


def stream_member(
    bundle: Path, member: Member, length: int, sink: Callable[[bytes], None], chunk_size: int = CHUNK_SIZE
) -> int:
    """Feed exactly ``min(length, member.size)`` bytes of the member to ``sink``; return the count."""
    want = min(length, member.size)
    done = 0
    fd = os.open(bundle, os.O_RDONLY)
    try:
        while done < want:
            chunk = os.pread(fd, min(chunk_size, want - done), member.offset + done)
            if not chunk:
                break
            sink(chunk)
            done += len(chunk)
    finally:
        os.close(fd)
    return done
