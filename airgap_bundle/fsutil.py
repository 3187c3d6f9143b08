"""Filesystem helpers: streamed hashing, atomic writes, staging directories."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

# Read size for streamed hashing and copying; large enough for throughput, small enough
# that memory stays bounded whatever the file size.
CHUNK_SIZE = 1024 * 1024


def sha256_stream(
    stream: BinaryIO, limit: int | None = None, on_chunk: Callable[[int], None] | None = None
) -> tuple[str, int]:
    """Hash ``stream`` in chunks; return (hex digest, bytes read). Reads at most ``limit`` bytes."""
    digest = hashlib.sha256()
    total = 0
    while True:
        want = CHUNK_SIZE if limit is None else min(CHUNK_SIZE, limit - total)
        if want <= 0:
            break
        chunk = stream.read(want)
        if not chunk:
            break
        digest.update(chunk)
        total += len(chunk)
        if on_chunk is not None:
            on_chunk(len(chunk))
    return digest.hexdigest(), total


def sha256_file(path: Path, on_chunk: Callable[[int], None] | None = None) -> tuple[str, int]:
    """(hex sha256, length) of a file, streamed."""
    with open(path, "rb") as stream:
        return sha256_stream(stream, on_chunk=on_chunk)


def write_bytes_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, obj: Any, mode: int = 0o644) -> None:
    """Atomic JSON write with sorted keys and a trailing newline (stable bytes)."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), mode)


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """A fresh sibling directory of ``final``; removed on error, left for the caller to move on success."""
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.staging-", dir=final.parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def replace_dir(stage: Path, final: Path) -> None:
    """Move a finished staging directory into place.

    An existing ``final`` is first renamed aside and only deleted after the new one is in
    place, so at every instant ``final`` is either the complete old or the complete new tree.
    """
    if final.exists() or final.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, old / "tree")
        try:
            os.replace(stage, final)
        except BaseException:
            os.replace(old / "tree", final)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, final)
