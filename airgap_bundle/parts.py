"""Splitting a bundle into parts (FAT32 sticks, size-capped media) and joining them back.

The parts index (``<bundle>.parts.json``) is NOT signed: its hashes only say which part is
damaged. Trust comes from ``verify_bundle`` on the joined tar, which must always follow.
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

from .errors import BundleError
from .fsutil import CHUNK_SIZE, write_json_atomic
from .progress import NullProgress, ProgressSink

MAX_INDEX_BYTES = 1024 * 1024
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)
_PART_NAME = re.compile(r"^[A-Za-z0-9._+-]+\.part-\d{4,}$")


class PartsError(BundleError):
    """A part is missing, has the wrong length or hash, or the index is unusable."""


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
        raise PartsError(f"{index}: expected a parts index of at most {MAX_INDEX_BYTES} bytes, found none or larger")
    try:
        data = json.loads(index.read_text())
        parts = data["parts"]
        for part in parts:
            if not _PART_NAME.match(part["file"]) or not isinstance(part["length"], int):
                raise PartsError(f"{index}: expected part names like NAME.part-0001, found {part['file']!r}")
    except (ValueError, KeyError, TypeError) as exc:
        raise PartsError(f"{index}: expected a parts index (bundle, size, sha256, parts), found: {exc}") from exc
    return dict(data)


def join_parts(index: Path, out: Path, progress: ProgressSink | None = None) -> Path:
    """Concatenate the parts listed in ``index`` into ``out``, checking every part; atomic."""
    index, out = Path(index), Path(out)
    progress = progress or NullProgress()
    data = _load_index(index)
    whole = hashlib.sha256()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        progress.begin("joining", int(data.get("size", 0)))
        with os.fdopen(fd, "wb") as dst:
            for part in data["parts"]:
                path = index.parent / part["file"]
                if not path.is_file() or path.stat().st_size != part["length"]:
                    found = f"{path.stat().st_size} bytes" if path.is_file() else "none"
                    raise PartsError(f"{path}: expected a part of {part['length']} bytes, found {found}")
                digest = hashlib.sha256()
                with open(path, "rb") as src:
                    while chunk := src.read(CHUNK_SIZE):
                        digest.update(chunk)
                        whole.update(chunk)
                        dst.write(chunk)
                        progress.advance(len(chunk))
                if digest.hexdigest() != part["sha256"]:
                    raise PartsError(f"{path}: expected sha256 {part['sha256']}, found {digest.hexdigest()}")
        progress.end()
        if whole.hexdigest() != data["sha256"]:
            raise PartsError(f"{index}: expected joined sha256 {data['sha256']}, found {whole.hexdigest()}")
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return out
