"""Unpacking a verified bundle: only signed targets, re-hashed while copying, staged then renamed.

The report must be ok. Each listed target is copied from its tar member in bounded chunks
while hashed; a length or hash that differs from the report (for example the bundle was
replaced since verification) aborts the whole unpack and removes the staging directory, so
``dest`` is never half-written. Trusted state is not committed here: call ``commit_trust``.
Targets a delta bundle left out are copied (and re-hashed) from the report's base directory.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .base_source import BaseFileProblem, stream_base_file
from .errors import UnpackError
from .fsutil import replace_dir, staging_dir
from .layout import Limits, path_problem, target_member
from .progress import NullProgress, ProgressSink
from .report import VerificationReport
from .tar_reader import Member, StructureProblem, scan_members, stream_member


def _copy_target(bundle: Path, member: Member | None, dest_file: Path, length: int, sha256: str,
                 progress: ProgressSink, base: tuple[Path, str] | None = None) -> None:
    """Copy one target from its tar member, or (delta bundle) from ``base`` = (base_dir, path)."""
    digest = hashlib.sha256()
    dest_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(dest_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as out:

        def sink(chunk: bytes) -> None:
            digest.update(chunk)
            out.write(chunk)
            progress.advance(len(chunk))

        if base is not None:
            try:
                size = stream_base_file(base[0], base[1], length, sink)
            except BaseFileProblem as exc:
                raise UnpackError(f"{base[1]}: {exc}") from exc
            copied = size
        else:
            assert member is not None
            copied = stream_member(bundle, member, length, sink)
        out.flush()
        os.fsync(out.fileno())
    if copied != length or digest.hexdigest() != sha256:
        raise UnpackError(f"{dest_file.name}: expected {length} bytes sha256 {sha256} (verified), "
                          f"found {copied} bytes sha256 {digest.hexdigest()}")


def unpack_bundle(
    bundle: Path,
    dest: Path,
    report: VerificationReport,
    *,
    limits: Limits | None = None,
    progress: ProgressSink | None = None,
) -> list[Path]:
    """Write the verified targets of ``bundle`` under ``dest`` (absent or empty); return their paths."""
    bundle, dest = Path(bundle), Path(dest)
    progress = progress or NullProgress()
    if not report.ok:
        failed = report.first_failure()
        raise UnpackError(f"{bundle}: expected a passed verification report, found failed check "
                          f"{failed.label if failed else '?'}")
    if not report.targets:
        raise UnpackError(f"{bundle}: expected verified targets in the report, found none")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UnpackError(f"{dest}: expected an absent or empty destination directory, found existing content")
    try:
        members = scan_members(bundle, limits or Limits())
    except StructureProblem as exc:
        raise UnpackError(f"{bundle}: {exc} [{exc.member}]") from exc
    written: list[Path] = []
    with staging_dir(dest) as stage:
        progress.begin("unpacking", sum(t.length for t in report.targets.values()))
        for path, info in sorted(report.targets.items()):
            problem = path_problem(path)
            if problem:
                raise UnpackError(f"{path}: expected a safe relative path, found {problem}")
            if path in report.from_base:
                _copy_target(bundle, None, stage / path, info.length, info.sha256, progress,
                             base=(Path(report.base_dir), path))
                written.append(dest / path)
                continue
            member = members.get(target_member(path))
            if member is None or member.size != info.length:
                found = "none" if member is None else f"{member.size} bytes"
                raise UnpackError(f"{path}: expected a member of {info.length} bytes (verified), found {found}")
            _copy_target(bundle, member, stage / path, info.length, info.sha256, progress)
            written.append(dest / path)
        progress.end()
        replace_dir(stage, dest)
    return written
