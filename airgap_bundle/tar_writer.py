"""A deterministic tar writer: same entries in, same bytes out; file data is hashed as it is written.

Entries are regular files only, with fixed mode/owner/mtime, UTF-8 names and GNU headers (no
pax records, so no sub-second timestamps or host-specific data). The caller fixes the order;
names must be unique. ``add_file`` reads each input exactly once: the bytes it hashes are the
bytes it writes, so what is signed is what the tar holds, and a file that changes while it is
read is refused. Hashing runs on two helper threads (whole-file sha256 and per-chunk sha256)
while the calling thread reads and writes the next buffer.
"""

from __future__ import annotations

import hashlib
import tarfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from .errors import BuildError
from .hashing import ChunkHashes
from .progress import NullProgress, ProgressSink

FILE_MODE = 0o644
COPY_BYTES = 4 * 1024 * 1024  # one read/write/hash step; two such buffers are in use per file


class _StreamHasher:
    """sha256 of a stream and (optionally) of each ``chunk_size`` chunk, off the calling thread.

    ``feed`` first waits for the previous buffer's hashing, so one buffer is hashed while the
    caller fills the other: memory stays at two buffers whatever the file size.
    """

    def __init__(self, chunk_size: int | None, pool: ThreadPoolExecutor) -> None:
        self.full = hashlib.sha256()
        self.chunk_size = chunk_size
        self.chunks: list[str] = []
        self._current = hashlib.sha256()
        self._current_len = 0
        self._pool = pool
        self._pending: list[Future[None]] = []

    def _update_chunks(self, data: memoryview) -> None:
        assert self.chunk_size is not None
        while data:
            take = min(len(data), self.chunk_size - self._current_len)
            self._current.update(data[:take])
            self._current_len += take
            data = data[take:]
            if self._current_len == self.chunk_size:
                self.chunks.append(self._current.hexdigest())
                self._current, self._current_len = hashlib.sha256(), 0

    def wait(self) -> None:
        for future in self._pending:
            future.result()
        self._pending = []

    def feed(self, data: memoryview) -> None:
        self.wait()
        self._pending = [self._pool.submit(self.full.update, data)]
        if self.chunk_size is not None:
            self._pending.append(self._pool.submit(self._update_chunks, data))

    def finish(self) -> tuple[str, ChunkHashes | None]:
        self.wait()
        if self.chunk_size is None:
            return self.full.hexdigest(), None
        if self._current_len:
            self.chunks.append(self._current.hexdigest())
        return self.full.hexdigest(), ChunkHashes(self.chunk_size, tuple(self.chunks))


def _header(name: str, size: int, mtime: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = FILE_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "strict")


class DeterministicTar:
    """Context manager writing a tar to ``stream``; ``close`` (or leaving the block) ends the archive."""

    def __init__(self, stream: BinaryIO, mtime: int, progress: ProgressSink | None = None) -> None:
        self._stream = stream
        self._mtime = mtime
        self._names: set[str] = set()
        self._offset = 0
        self._progress = progress or NullProgress()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tar-sha256")
        self._buffers = (memoryview(bytearray(COPY_BYTES)), memoryview(bytearray(COPY_BYTES)))

    def __enter__(self) -> DeterministicTar:
        return self

    def __exit__(self, kind: object, *exc: object) -> None:
        self._pool.shutdown(wait=True)
        if kind is None:
            self.close()

    def _write(self, data: bytes | memoryview) -> None:
        self._stream.write(data)
        self._offset += len(data)

    def _begin(self, name: str, size: int) -> None:
        if name in self._names:
            raise BuildError(f"tar entry {name!r} added twice")
        self._names.add(name)
        self._write(_header(name, size, self._mtime))

    def _pad(self) -> None:
        remainder = self._offset % tarfile.BLOCKSIZE
        if remainder:
            self._write(tarfile.NUL * (tarfile.BLOCKSIZE - remainder))

    def add_bytes(self, name: str, data: bytes) -> None:
        self._begin(name, len(data))
        self._write(data)
        self._pad()

    def add_file(self, name: str, source: Path, length: int,
                 chunk_size: int | None = None) -> tuple[str, ChunkHashes | None]:
        """Copy ``length`` bytes of ``source``; return (sha256, chunk hashes when ``chunk_size``)."""
        self._begin(name, length)
        hasher = _StreamHasher(chunk_size, self._pool)
        copied, turn = 0, 0
        with open(source, "rb", buffering=0) as stream:
            while copied < length:
                buf = self._buffers[turn]  # the other one may still be being hashed
                turn ^= 1
                got = stream.readinto(buf[: min(COPY_BYTES, length - copied)])
                if not got:
                    break
                self._write(buf[:got])
                hasher.feed(buf[:got])
                copied += got
                self._progress.advance(got)
            extra = stream.read(1)
        full, chunks = hasher.finish()
        if copied != length or extra:
            raise BuildError(f"{source}: changed during the build: expected {length} bytes, "
                             f"found {copied}{'+' if extra else ''}")
        self._pad()
        return full, chunks

    def close(self) -> None:
        """End-of-archive marker (two zero blocks), then zero padding to a whole 10240-byte record."""
        self._write(tarfile.NUL * (2 * tarfile.BLOCKSIZE))
        remainder = self._offset % tarfile.RECORDSIZE
        if remainder:
            self._write(tarfile.NUL * (tarfile.RECORDSIZE - remainder))
