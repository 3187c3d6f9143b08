"""Names inside a bundle tar and the rules every member name must follow."""

from __future__ import annotations

import re
from dataclasses import dataclass

METADATA_DIR = "metadata/"
TARGETS_DIR = "targets/"
TOP_LEVEL_ROLES = ("root", "timestamp", "snapshot", "targets")
VERSIONED_ROOT = re.compile(r"^metadata/([1-9][0-9]{0,8})\.root\.json$")
MANIFEST = "manifest.json"
SBOM = "sbom.cdx.json"
# Smallest signed chunk a verifier accepts: bounds the chunk-hash list (and the jobs) per byte.
MIN_CHUNK_BYTES = 1024 * 1024
# Characters refused in any path component: control characters and the Windows separator.
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")


@dataclass(frozen=True)
class Limits:
    """Size limits applied while reading an untrusted bundle (all configurable)."""

    max_members: int = 100_000
    max_metadata_bytes: int = 16 * 1024 * 1024
    max_manifest_bytes: int = 16 * 1024 * 1024
    max_root_rotations: int = 64
    max_path_length: int = 1024
    # End-of-archive marker plus zero padding after the last member: tar writers pad to whole
    # 10240-byte records, so at most 1024 + 9728 bytes; two records leave room for other writers.
    max_trailing_bytes: int = 20480
    min_chunk_bytes: int = MIN_CHUNK_BYTES
    # Largest single header record (GNU long name, pax header) the tar parser may read into memory.
    max_header_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        for name in ("max_members", "max_metadata_bytes", "max_manifest_bytes", "max_root_rotations",
                     "max_path_length", "max_trailing_bytes", "min_chunk_bytes", "max_header_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def path_problem(path: str, max_length: int = 1024) -> str:
    """Why ``path`` is not a safe relative POSIX path, or "" when it is."""
    if not path:
        return "empty path"
    if len(path) > max_length:
        return f"path longer than {max_length} characters"
    if path.startswith("/"):
        return "absolute path"
    if _BAD_CHARS.search(path):
        return "control character or backslash in path"
    for part in path.split("/"):
        if part in ("", ".", ".."):
            return f"path component {part!r} (empty, '.' or '..')"
    return ""


def metadata_member(role: str) -> str:
    return f"{METADATA_DIR}{role}.json"


def is_known_metadata(name: str) -> bool:
    return name in {metadata_member(r) for r in TOP_LEVEL_ROLES} or VERSIONED_ROOT.match(name) is not None


def target_member(path: str) -> str:
    return f"{TARGETS_DIR}{path}"
