"""Splitting a bundle into parts (FAT32 sticks, size-capped media) and joining them back.

The parts index (``<bundle>.parts.json``) is NOT signed: its hashes only say which part is
damaged, missing or out of place. Trust comes from ``verify_bundle`` on the joined tar, which
must always follow: a part set rearranged consistently with a rewritten index joins into a
tar that fails verification.

Joining runs its own numbered checks, each failure naming the check and the part file:

1 parts index     readable, at most MAX_INDEX_BYTES, well-formed entries
2 part order      part N is named <bundle>.part-NNNN, numbered 1..count without gaps; every
                  part but the last has exactly part_size bytes; lengths add up to size
3 part present    each part file exists with its listed length
4 part sha256     each part's sha256 matches the index (a swapped or damaged part)
5 joined bundle   the joined bytes have the index's total sha256
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from .errors import VerificationError
from .fsutil import CHUNK_SIZE, write_json_atomic
from .progress import NullProgress, ProgressSink

MAX_INDEX_BYTES = 1024 * 1024
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)
_PART_NAME = re.compile(r"^[A-Za-z0-9._+-]+\.part-\d{4,}$")


PARTS_CHECKS = ("1 parts index", "2 part order", "3 part present", "4 part sha256", "5 joined bundle")


class PartsError(VerificationError):
    """A part is missing, out of order, has the wrong length or hash, or the index is unusable.

    ``check`` is one of ``PARTS_CHECKS``; ``path`` the part file (or the index) concerned.
    """

    def __init__(self, check: int, message: str, path: Path | str) -> None:
        super().__init__(PARTS_CHECKS[check - 1], message, str(path))


def parse_size(text: str) -> int:
    """"4G" -> 4 GiB, "512M", "1000" (bytes)."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"size must look like 4G, 512M or a byte count, got {text!r}")
    value = int(match.group(1)) * 1024 ** " KMGT".index((match.group(2) or " ").upper())
    if value < 1:
        raise ValueError(f"size must be >= 1 byte, got {text!r}")
    return value


def _write_part(path: Path, src: Any, length: int, whole: Any, progress: ProgressSink) -> dict[str, Any]:
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # a bundle is public; only its signatures matter
        with os.fdopen(fd, "wb") as out:
            done = 0
            while done < length:
                chunk = src.read(min(CHUNK_SIZE, length - done))
                if not chunk:
                    break
                digest.update(chunk)
                whole.update(chunk)
                out.write(chunk)
                done += len(chunk)
                progress.advance(len(chunk))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return {"file": path.name, "length": done, "sha256": digest.hexdigest()}


def split_bundle(bundle: Path, out_dir: Path, part_size: int, progress: ProgressSink | None = None) -> Path:
    """Write ``<name>.part-NNNN`` files of at most ``part_size`` bytes and the index; return the index path."""
    if part_size < 1:
        raise ValueError(f"part_size must be >= 1, got {part_size}")
    bundle, out_dir = Path(bundle), Path(out_dir)
    progress = progress or NullProgress()
    out_dir.mkdir(parents=True, exist_ok=True)
    size = bundle.stat().st_size
    count = max(1, -(-size // part_size))
    whole = hashlib.sha256()
    parts = []
    progress.begin("splitting", size)
    with open(bundle, "rb") as src:
        for n in range(1, count + 1):
            length = min(part_size, size - (n - 1) * part_size)
            parts.append(_write_part(out_dir / f"{bundle.name}.part-{n:04d}", src, length, whole, progress))
    progress.end()
    index = out_dir / f"{bundle.name}.parts.json"
    write_json_atomic(index, {"bundle": bundle.name, "size": size, "sha256": whole.hexdigest(),
                              "part_size": part_size, "parts": parts})
    return index


def _load_index(index: Path) -> dict[str, Any]:
    if not index.is_file() or index.stat().st_size > MAX_INDEX_BYTES:
        raise PartsError(1, f"expected a parts index of at most {MAX_INDEX_BYTES} bytes, found none or larger", index)
    try:
        data = json.loads(index.read_text())
        parts, size, part_size = data["parts"], data["size"], data["part_size"]
        if not isinstance(data["bundle"], str) or not isinstance(data["sha256"], str) or not parts:
            raise TypeError("bundle and sha256 must be strings, parts non-empty")
        for part in parts:
            if not _PART_NAME.match(part["file"]) or not isinstance(part["length"], int) \
                    or not isinstance(part["sha256"], str):
                raise PartsError(1, f"expected part entries like NAME.part-0001 with length and sha256, "
                                    f"found {part!r:.200}", index)
        if not all(isinstance(v, int) and v >= 0 for v in (size, part_size)):
            raise TypeError("size and part_size must be non-negative integers")
    except (ValueError, KeyError, TypeError) as exc:
        raise PartsError(1, f"expected a parts index (bundle, size, sha256, part_size, parts), found: {exc}",
                         index) from exc
    for n, part in enumerate(parts, start=1):
        want = f"{data['bundle']}.part-{n:04d}"
        if part["file"] != want:
            raise PartsError(2, f"expected part {n} of {len(parts)} to be {want}, found {part['file']} "
                                "(missing or reordered part)", index.parent / part["file"])
        if n < len(parts) and part["length"] != part_size:
            raise PartsError(2, f"expected {part_size} bytes in every part but the last, found {part['length']}",
                             index.parent / part["file"])
    if sum(p["length"] for p in parts) != size:
        raise PartsError(2, f"expected the parts to add up to {size} bytes, found "
                            f"{sum(p['length'] for p in parts)} (missing part)", index)
    return dict(data)


def join_parts(index: Path, out: Path, progress: ProgressSink | None = None) -> Path:
    """Concatenate the parts listed in ``index`` into ``out``, checking every part; atomic.

    The result still has to pass ``verify_bundle``: the index is not signed.
    """
    index, out = Path(index), Path(out)
    progress = progress or NullProgress()
    data = _load_index(index)
    whole = hashlib.sha256()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        os.fchmod(fd, 0o644)
        progress.begin("joining", int(data["size"]))
        with os.fdopen(fd, "wb") as dst:
            for part in data["parts"]:
                path = index.parent / part["file"]
                if not path.is_file() or path.stat().st_size != part["length"]:
                    found = f"{path.stat().st_size} bytes" if path.is_file() else "none"
                    raise PartsError(3, f"expected a part of {part['length']} bytes, found {found}", path)
                digest = hashlib.sha256()
                with open(path, "rb") as src:
                    while chunk := src.read(CHUNK_SIZE):
                        digest.update(chunk)
                        whole.update(chunk)
                        dst.write(chunk)
                        progress.advance(len(chunk))
                if digest.hexdigest() != part["sha256"]:
                    raise PartsError(4, f"expected sha256 {part['sha256']}, found {digest.hexdigest()} "
                                        "(damaged or swapped part)", path)
        progress.end()
        if whole.hexdigest() != data["sha256"]:
            raise PartsError(5, f"expected joined sha256 {data['sha256']}, found {whole.hexdigest()}", index)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return out
