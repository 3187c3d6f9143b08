"""Per-run working directory under ROOT/.staging and the installer lock on ROOT."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from installer.errors import InstallerBusy
from installer.layout import RootLayout


@contextmanager
def installer_lock(layout: RootLayout) -> Iterator[None]:
    """Hold an exclusive lock on ROOT for one installer run; refuse if another run holds it."""
    layout.root.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd = os.open(layout.lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise InstallerBusy(f"{layout.lock}: expected no other installer run on {layout.root}, "
                                "found one holding the lock") from exc
        yield
    finally:
        os.close(fd)


def lock_held(layout: RootLayout) -> bool:
    """Whether an installer run holds the lock on ROOT right now (probes without waiting)."""
    try:
        fd = os.open(layout.lock, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@contextmanager
def run_dir(layout: RootLayout) -> Iterator[Path]:
    """A private directory for one run (unpacked bundle, ansible temp files), removed after."""
    layout.staging.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="run-", dir=layout.staging))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        try:
            layout.staging.rmdir()
        except OSError:
            pass  # another run's directory is still there
