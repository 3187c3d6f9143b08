"""Reading unchanged targets of a delta bundle from a base release directory, safely.

Files are opened component by component relative to directory descriptors with
``O_NOFOLLOW``, so no symbolic link anywhere under the base can redirect a read, and only
regular files are accepted.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from .fsutil import CHUNK_SIZE


class BaseFileProblem(Exception):
    """A base file is missing, not a regular file, or reached through a link."""


def open_base_file(base_dir: Path, path: str) -> int:
    """File descriptor of ``base_dir/path`` (read-only); caller closes it."""
    parts = path.split("/")
    try:
        fd = os.open(base_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise BaseFileProblem(f"expected a base directory {base_dir}, found none") from exc
    try:
        for part in parts[:-1]:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
        file_fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
    except OSError as exc:
        raise BaseFileProblem(f"expected a regular file in the base, found none or a link ({exc.strerror})") from exc
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(file_fd).st_mode):
        os.close(file_fd)
        raise BaseFileProblem("expected a regular file in the base, found a special file")
    return file_fd


def stream_base_file(base_dir: Path, path: str, length: int, sink: Callable[[bytes], None]) -> int:
    """Feed at most ``length`` bytes to ``sink``; return the file's true size (to detect longer files)."""
    fd = open_base_file(base_dir, path)
    try:
        size = os.fstat(fd).st_size
        done = 0
        while done < min(length, size):
            chunk = os.read(fd, min(CHUNK_SIZE, length - done))
            if not chunk:
                break
            sink(chunk)
            done += len(chunk)
        return size if done == min(length, size) else done
    finally:
        os.close(fd)
