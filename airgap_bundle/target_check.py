"""Check 8, target files: every signed target present, exact length, sha256 (or signed chunk hashes).

Structural rules come first and read no target data: no target is also a directory of others,
paths are safe, each target has a sha256, each tar member has exactly the signed length (so no
byte beyond a signed length is ever hashed), no member is unlisted. Then all hashing jobs (one
per small target, one per signed chunk of a large one) run on ``workers`` threads; results are
compared in a fixed order, so the first failure reported does not depend on thread timing, and
the remaining jobs are cancelled. A delta bundle's omitted targets are read from the base
release through ``base_source`` (no symbolic links followed), after checking their size.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path

from tuf.api.metadata import TargetFile

from .base_source import BaseFileProblem, open_base_file
from .check_failure import CheckFailure as _Fail
from .hashing import CHUNK_FIELD, ChunkHashes, Opener, RangeJob, hash_ranges, spans
from .layout import MANIFEST, TARGETS_DIR, Limits, path_problem, target_member
from .progress import ProgressSink
from .tar_reader import Member


class TargetFilesCheck:
    """One run of check 8 over the signed ``listed`` targets; ``from_base`` says which came from the base."""

    def __init__(self, bundle: Path, members: Mapping[str, Member], listed: Mapping[str, TargetFile],
                 limits: Limits, workers: int, progress: ProgressSink, base_dir: Path | None) -> None:
        self.bundle, self.members, self.listed = bundle, members, listed
        self.limits, self.workers, self.progress, self.base_dir = limits, workers, progress, base_dir
        self.from_base: list[str] = []

    def _opener(self, path: str, length: int) -> tuple[Opener, int]:
        """(opener, data offset) of a target: its tar member, or for a delta bundle the base file."""
        if path not in self.from_base:
            bundle = self.bundle
            return (lambda: os.open(bundle, os.O_RDONLY)), self.members[target_member(path)].offset
        assert self.base_dir is not None
        base_dir = self.base_dir

        def open_base() -> int:
            try:
                return open_base_file(base_dir, path)
            except BaseFileProblem as exc:
                raise _Fail(str(exc), path) from exc

        fd = open_base()
        size = os.fstat(fd).st_size
        os.close(fd)
        if size != length:
            raise _Fail(f"expected {length} bytes in the base release, found {size}", path)
        return open_base, 0

    def _jobs(self, path: str, length: int, sha256: str, chunks: ChunkHashes | None) -> list[tuple[RangeJob, str]]:
        opener, offset = self._opener(path, length)
        if chunks is None:
            return [(RangeJob(path, -1, opener, offset, length), sha256)]
        return [(RangeJob(path, i, opener, offset + start, n), chunks.sha256[i])
                for i, (start, n) in enumerate(spans(length, chunks.size))]

    def _chunks(self, path: str, custom: object, length: int) -> ChunkHashes | None:
        if custom is None:
            return None
        if not isinstance(custom, dict):
            raise _Fail(f"expected a custom object in targets.json, found {type(custom).__name__}", path)
        if CHUNK_FIELD not in custom:
            return None
        try:
            return ChunkHashes.from_custom(custom[CHUNK_FIELD], length, self.limits.min_chunk_bytes)
        except ValueError as exc:
            raise _Fail(f"expected signed {CHUNK_FIELD} consistent with the length, found: {exc}", path) from exc

    def run(self) -> str:
        listed = self.listed
        parents = {p.rsplit("/", i)[0] for p in listed for i in range(1, p.count("/") + 1)}
        chunks: dict[str, ChunkHashes | None] = {}
        for path, tf in sorted(listed.items()):
            if path in parents:
                raise _Fail("expected a file path, found a target that is also a directory of other targets", path)
            problem = path_problem(path, self.limits.max_path_length)
            if problem:
                raise _Fail(f"expected a safe relative target path, found {problem}", path)
            if "sha256" not in tf.hashes:
                raise _Fail(f"expected a sha256 hash in targets.json, found {sorted(tf.hashes)}", path)
            chunks[path] = self._chunks(path, tf.custom, tf.length)
            member = self.members.get(target_member(path))
            if member is None:
                if self.base_dir is None or path == MANIFEST:
                    raise _Fail(f"expected {target_member(path)} ({tf.length} bytes), found none "
                                "(a delta bundle also needs the base release directory)", path)
                self.from_base.append(path)
                continue
            if member.size != tf.length:  # before reading: no byte beyond the signed length is hashed
                raise _Fail(f"expected {tf.length} bytes, found {member.size}", path)
        for name in sorted(self.members):
            if name.startswith(TARGETS_DIR) and name[len(TARGETS_DIR):] not in listed:
                raise _Fail("expected only targets listed in targets.json, found an unlisted file", name)
        jobs = [job for path in sorted(listed)
                for job in self._jobs(path, listed[path].length, listed[path].hashes["sha256"], chunks[path])]
        expected = {(job.key, job.index): want for job, want in jobs}
        self.progress.begin("verifying targets", sum(job.length for job, _ in jobs))
        results = hash_ranges([job for job, _ in jobs], self.workers, self.progress.advance)
        with contextlib.closing(results):
            for result in results:
                job = result.job
                where = " in the base release" if job.key in self.from_base else ""
                part = "" if job.index < 0 else f" chunk {job.index} ({chunks[job.key].size} bytes each)"  # type: ignore[union-attr]
                if result.read != job.length:
                    raise _Fail(f"expected {job.length} bytes{part}{where}, found {result.read}", job.key)
                if result.sha256 != expected[(job.key, job.index)]:
                    raise _Fail(f"expected sha256 {expected[(job.key, job.index)]}{part}{where}, "
                                f"found {result.sha256}", job.key)
        self.progress.end()
        if MANIFEST not in listed:
            raise _Fail(f"expected a {MANIFEST} target, found none", MANIFEST)
        base = f" ({len(self.from_base)} from the base release)" if self.from_base else ""
        chunked = sum(1 for c in chunks.values() if c is not None)
        return (f"{len(listed)} target(s){base}, {sum(t.length for t in listed.values())} bytes, lengths and sha256 "
                f"match ({chunked} large target(s) by signed chunk hashes, {len(jobs)} jobs on {self.workers} workers)")
