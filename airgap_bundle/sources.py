"""Collecting the input trees of a bundle (model, policies, playbooks, wheelhouse) as target paths."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import BuildError
from .layout import path_problem

SKIPPED_NAMES = ("__pycache__",)


@dataclass(frozen=True)
class SourceFile:
    """One file going into the bundle: its target path and where it comes from."""

    target: str  # e.g. "model/config.json"
    source: Path


def collect_tree(root: Path, prefix: str) -> list[SourceFile]:
    """Regular files under ``root`` as ``<prefix>/<relative path>``, sorted.

    Hidden files and ``__pycache__`` are skipped; a symbolic link or special file is refused,
    so what is signed is exactly what lies in the tree.
    """
    root = Path(root)
    if not root.is_dir():
        raise BuildError(f"{root}: expected a directory for {prefix}/, found none")
    files: list[SourceFile] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIPPED_NAMES)
        for entry in sorted(dirnames):
            if (Path(dirpath) / entry).is_symlink():
                raise BuildError(f"{Path(dirpath) / entry}: expected a directory, found a symbolic link")
        for filename in sorted(filenames):
            if filename.startswith("."):
                continue
            path = Path(dirpath) / filename
            mode = os.lstat(path).st_mode
            if not stat.S_ISREG(mode):
                kind = "symbolic link" if stat.S_ISLNK(mode) else "special file"
                raise BuildError(f"{path}: expected a regular file, found a {kind}")
            target = f"{prefix}/{path.relative_to(root).as_posix()}"
            problem = path_problem(target)
            if problem:
                raise BuildError(f"{path}: expected a portable relative path, found {problem}")
            files.append(SourceFile(target, path))
    if not files:
        raise BuildError(f"{root}: expected at least one file for {prefix}/, found none")
    return sorted(files, key=lambda f: f.target)
