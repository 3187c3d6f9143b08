"""Streamed, parallel sha256: byte ranges of files, and the signed per-chunk hashes of large targets.

The sha256 of one stream is inherently sequential, so a bundle with one 5 GB weight file would
verify on one core. Targets longer than one chunk therefore also carry the sha256 of every
fixed-size chunk (signed in targets.json, custom field ``sha256_chunks``), and the verifier
hashes those chunks on all workers at once.

Reads use ``os.preadv`` into one reused buffer per worker thread (no allocation per read;
hashlib releases the GIL for large updates). Every job opens its own file descriptor, so the
kernel's readahead sees one sequential stream per job rather than interleaved offsets.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

CHUNK_FIELD = "sha256_chunks"
DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024
# Read size: 1 MiB stays in the L2 cache between the copy out of the page cache and the hash.
READ_BYTES = 1024 * 1024

Opener = Callable[[], int]  # returns a new read-only file descriptor; the caller closes it


def default_workers() -> int:
    """Hashing threads: one per CPU, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def spans(length: int, chunk_size: int) -> list[tuple[int, int]]:
    """(offset, length) of each chunk of a ``length``-byte file; one empty span for an empty file."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return [(start, min(chunk_size, length - start)) for start in range(0, length, chunk_size)] or [(0, 0)]


@dataclass(frozen=True)
class ChunkHashes:
    """sha256 (hex) of each ``size``-byte chunk of a target, in order; the last may be shorter."""

    size: int
    sha256: tuple[str, ...]

    def to_custom(self) -> dict[str, Any]:
        return {"chunk_size": self.size, "sha256": list(self.sha256)}

    @classmethod
    def from_custom(cls, obj: object, length: int, min_size: int) -> ChunkHashes:
        """Parse and check the signed field against the target's signed length; ValueError if malformed."""
        if not isinstance(obj, dict) or set(obj) != {"chunk_size", "sha256"}:
            raise ValueError(f"expected {{chunk_size, sha256}}, found {obj!r:.200}")
        size, hashes = obj["chunk_size"], obj["sha256"]
        if not isinstance(size, int) or isinstance(size, bool) or size < min_size:
            raise ValueError(f"expected a chunk_size >= {min_size}, found {size!r}")
        if not isinstance(hashes, list) or not all(isinstance(h, str) and len(h) == 64 for h in hashes):
            raise ValueError("expected a list of 64-digit hex sha256 values")
        want = len(spans(length, size))
        if len(hashes) != want:
            raise ValueError(f"expected {want} chunk hashes for {length} bytes in chunks of {size}, "
                             f"found {len(hashes)}")
        return cls(size, tuple(hashes))


@dataclass(frozen=True)
class RangeJob:
    """Hash ``length`` bytes at ``offset`` of what ``opener`` opens; ``key`` names it in results."""

    key: str
    index: int  # chunk index, or -1 for a whole file
    opener: Opener
    offset: int
    length: int


@dataclass(frozen=True)
class RangeResult:
    job: RangeJob
    sha256: str
    read: int  # bytes actually read: less than job.length when the file is shorter


_local = threading.local()


def _buffer() -> memoryview:
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = memoryview(bytearray(READ_BYTES))
    return buf  # type: ignore[no-any-return]


def hash_range(job: RangeJob, advance: Callable[[int], None]) -> RangeResult:
    """sha256 of the job's byte range, streamed through this thread's reused buffer."""
    buf = _buffer()
    digest = hashlib.sha256()
    fd = job.opener()
    try:
        if job.length:
            os.posix_fadvise(fd, job.offset, job.length, os.POSIX_FADV_SEQUENTIAL)
        done = 0
        while done < job.length:
            view = buf[: min(READ_BYTES, job.length - done)]
            got = os.preadv(fd, [view], job.offset + done)
            if got <= 0:
                break
            digest.update(view[:got])
            done += got
            advance(got)
    finally:
        os.close(fd)
    return RangeResult(job, digest.hexdigest(), done)


def hash_ranges(jobs: Sequence[RangeJob], workers: int,
                advance: Callable[[int], None]) -> Generator[RangeResult, None, None]:
    """Results in job order, computed on ``workers`` threads.

    A consumer that stops early (first mismatch) cancels every job not yet started, so a bad
    bundle is rejected without hashing the rest. An opener's exception is raised in job order.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers == 1 or len(jobs) == 1:
        for job in jobs:
            yield hash_range(job, advance)
        return
    with ThreadPoolExecutor(max_workers=min(workers, len(jobs)), thread_name_prefix="sha256") as pool:
        futures: list[Future[RangeResult]] = [pool.submit(hash_range, job, advance) for job in jobs]
        try:
            for future in futures:
                yield future.result()
        finally:
            for future in futures:
                future.cancel()


def file_opener(path: str | os.PathLike[str]) -> Opener:
    return lambda: os.open(path, os.O_RDONLY)
