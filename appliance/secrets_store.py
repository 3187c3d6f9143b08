"""Small secret files of the appliance (the cache-salt key, the first admin's key): created once, mode 0600."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def ensure_secret(path: Path, nbytes: int = 32) -> str:
    """Return the secret stored at ``path``, creating it (0600, atomically) when absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise PermissionError(
                f"{path} is readable by group or others (mode {mode:o}); expected 0600 — "
                f"fix it with: chmod 600 {path}"
            )
        return path.read_text().strip()
    value = secrets.token_urlsafe(nbytes)
    write_secret(path, value)
    return value


def write_secret(path: Path, value: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
