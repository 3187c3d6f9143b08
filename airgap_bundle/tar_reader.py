"""Reading an untrusted bundle tar: member table with structural checks, bounded reads by offset.

Member data is read with ``os.pread`` at the member's data offset, never through tarfile's
extraction, so each reader holds its own position and nothing is written to disk.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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


def _check_end(bundle: Path, offset: int, size: int) -> None:
    """After the last member: the two zero blocks of the end marker, then only zero padding.

    A file cut at a member boundary looks like a shorter valid archive to tarfile; the missing
    end marker gives it away. Non-zero bytes after the marker would be data nobody verifies.
    """
    if size - offset < END_OF_ARCHIVE:
        raise StructureProblem(
            f"expected a {END_OF_ARCHIVE}-byte end-of-archive marker at offset {offset}, found {size - offset} "
            "bytes (truncated)"
        )
    with open(bundle, "rb") as stream:
        stream.seek(offset)
        while chunk := stream.read(CHUNK_SIZE):
            if chunk.count(0) != len(chunk):
                raise StructureProblem(f"expected only zero padding after offset {offset}, found trailing data")


def scan_members(bundle: Path, limits: Limits) -> dict[str, Member]:
    """Every member, validated: regular files only, safe unique names, data inside the file."""
    size = bundle.stat().st_size
    members: dict[str, Member] = {}
    try:
        with tarfile.open(bundle, mode="r:") as tar:
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
                if info.offset_data + info.size > size:
                    raise StructureProblem(
                        f"expected {info.size} data bytes at offset {info.offset_data}, found a file of {size} bytes "
                        "(truncated)", name
                    )
                members[name] = Member(name, info.offset_data, info.size)
            _check_end(bundle, tar.offset, size)
    except tarfile.TarError as exc:
        raise StructureProblem(f"expected a readable uncompressed tar, found: {exc}") from exc
    return members


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
