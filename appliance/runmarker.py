"""The run marker: ``DATA_DIR/appliance.run`` says a gateway run is in progress.

Written (atomically, fsynced with its directory) when a runtime opens, before it writes anything
else, and removed at a clean stop after the final records. A marker found at the next start
means the run it names ended without its clean stop (kill -9, power loss, OOM killer): the
runtime then reconciles the audit log (``reconcile.py``) before writing anything of its own.

A marker whose process is still alive (same pid, started no later than the marker says) belongs
to a gateway that is still serving from this data directory: ``RunMarkerError``, nothing written.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError

MARKER_NAME = "appliance.run"
MAX_MARKER_BYTES = 4096
_CLOCK_SLACK_S = 2.0  # /proc start times are in clock ticks, the marker's in microseconds


class RunMarkerError(ApplianceError):
    """Another live gateway holds this data directory's run marker."""


@dataclass(frozen=True)
class RunMarker:
    run_id: str  # uuid4 hex
    pid: int
    started_at: str  # RFC 3339, UTC, microseconds

    @classmethod
    def new(cls) -> RunMarker:
        now = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
        return cls(uuid.uuid4().hex, os.getpid(), now)

    def started(self) -> dt.datetime:
        return dt.datetime.fromisoformat(self.started_at).astimezone(dt.UTC)

    def to_json(self) -> str:
        return json.dumps({"run_id": self.run_id, "pid": self.pid, "started_at": self.started_at}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunMarker:
        """Parse a marker; ``ValueError`` naming what was expected when it is not one."""
        try:
            doc: Any = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError("run marker: expected a JSON object, found text that is not JSON") from None
        if not isinstance(doc, dict):
            raise ValueError(f"run marker: expected a JSON object, found {type(doc).__name__}")
        run_id, pid, started_at = doc.get("run_id"), doc.get("pid"), doc.get("started_at")
        if not (isinstance(run_id, str) and len(run_id) == 32 and all(c in "0123456789abcdef" for c in run_id)):
            raise ValueError(f"run marker: expected run_id as 32 lowercase hex digits, found {str(run_id)[:40]!r}")
        if isinstance(pid, bool) or not isinstance(pid, int) or pid < 1:
            raise ValueError(f"run marker: expected pid as a positive integer, found {str(pid)[:20]!r}")
        try:
            at = dt.datetime.fromisoformat(str(started_at))
        except ValueError:
            at = None
        if at is None or at.tzinfo is None:
            raise ValueError(f"run marker: expected started_at as an RFC 3339 time with its zone, "
                             f"found {str(started_at)[:40]!r}")
        return cls(run_id, pid, str(started_at))


def marker_path(data_dir: Path) -> Path:
    return data_dir / MARKER_NAME


def read_marker(path: Path) -> RunMarker | None:
    """The marker at ``path``; None when there is none. ``ValueError`` when it is unreadable."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_MARKER_BYTES + 1)
    except FileNotFoundError:
        return None
    if len(raw) > MAX_MARKER_BYTES:
        raise ValueError(f"run marker {path}: expected at most {MAX_MARKER_BYTES} bytes, found more")
    return RunMarker.from_json(raw.decode("utf-8", errors="replace"))


def write_marker(path: Path, marker: RunMarker) -> None:
    """Atomically: a temporary file beside it, fsynced, moved into place, the directory fsynced."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, marker.to_json().encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def remove_marker(path: Path, marker: RunMarker) -> bool:
    """Remove the marker if it is still ``marker`` (never another run's); True when removed."""
    try:
        current = read_marker(path)
    except ValueError:
        return False
    if current != marker:
        return False
    path.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return True


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _boot_time() -> float | None:
    with contextlib.suppress(OSError, ValueError), open("/proc/stat") as fh:
        for line in fh:
            if line.startswith("btime "):
                return float(line.split()[1])
    return None


def process_started_at(pid: int) -> float | None:
    """Unix time at which live process ``pid`` started; None if there is no such (non-zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):  # a zombie (killed, not yet reaped) or dead: not running
        return None
    boot = _boot_time()
    if boot is None:
        return None
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def holder_is_alive(marker: RunMarker) -> bool:
    """The process that wrote ``marker`` still runs: its pid is alive and started before the
    marker was written (a pid reused by a later process does not count). This process never
    counts: a marker with our own pid is an earlier runtime of this process that did not stop."""
    if marker.pid == os.getpid():
        return False
    started = process_started_at(marker.pid)
    return started is not None and started <= marker.started().timestamp() + _CLOCK_SLACK_S
