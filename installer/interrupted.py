"""Runs that did not finish: a marker (ROOT/.installer-run.json, beside the lock) written while an install, upgrade or
rollback holds the installer lock, and what the next run does when it finds one.

A run that ends (done, failed, refused, or stopped with Ctrl-C / SIGTERM) removes its marker and
journals the outcome itself. A marker that is still there when the next run takes the lock means
the process died (SIGKILL, power loss, a full disk that killed it): the lock is free again, but
nobody journalled how it ended. The next run then journals it as ``interrupted``, removes the
dead run's staging directories, and — when it is not resuming the same release — removes the
release directory the dead run left incomplete (a release without appliance.yaml is never in
service, see sovereign_release's tasks). Running the same install again resumes: Ansible copies
only the files that are not already there with the signed sha256, and every later step is
idempotent; `current` only ever moves atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from airgap_bundle.fsutil import write_bytes_atomic
from installer.journal import JournalEntry, journal_action
from installer.layout import RootLayout

MARKER_NAME = ".installer-run.json"


def marker_path(layout: RootLayout) -> Path:
    """Beside the lock, not under state/: a refused bundle must leave no state directory behind."""
    return layout.root / MARKER_NAME


@dataclass(frozen=True)
class DeadRun:
    """What the marker of a run that died says."""

    action: str
    version: str
    digest: str
    pid: int
    started: str
    previous: str | None
    nodes: list[str]

    def describe(self) -> str:
        return f"{self.action} of {self.version} started {self.started} by pid {self.pid}"


def read_marker(layout: RootLayout) -> DeadRun | None:
    """The marker's run, or None. A marker that cannot be parsed (cut short by a full disk) still
    says a run died: it is reported with what could be read."""
    path = marker_path(layout)
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return DeadRun("unknown", "unknown", "", 0, f"(marker unreadable: {exc.strerror})", None, [])
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not an object")
    except ValueError:
        data = {}
    nodes, pid = data.get("nodes"), data.get("pid")
    return DeadRun(action=str(data.get("action", "unknown")), version=str(data.get("version", "unknown")),
                   digest=str(data.get("digest", "")), pid=pid if isinstance(pid, int) else 0,
                   started=str(data.get("started", "(marker damaged)")), previous=data.get("previous") or None,
                   nodes=[str(n) for n in nodes] if isinstance(nodes, list) else [])


def _write_marker(layout: RootLayout, fields: dict[str, Any]) -> None:
    write_bytes_atomic(marker_path(layout), (json.dumps(fields, indent=1) + "\n").encode())


def _clear_marker(layout: RootLayout) -> None:
    try:
        marker_path(layout).unlink()
    except FileNotFoundError:
        pass


def clean_stale_staging(layout: RootLayout, keep: Path | None = None) -> list[str]:
    """Remove run directories under ROOT/.staging other than ``keep``. Only call while holding
    the installer lock: then no other run can own one."""
    removed = []
    if layout.staging.is_dir():
        for entry in layout.staging.iterdir():
            if entry.name.startswith("run-") and entry != keep:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
    return removed


def remove_incomplete_release(layout: RootLayout, version: str) -> bool:
    """Remove ROOT/releases/VERSION when it has no appliance.yaml (never complete, never current)."""
    if not version or "/" in version or version in (".", ".."):
        return False
    path = layout.release(version)
    if not path.is_dir() or path.is_symlink() or (path / "appliance.yaml").exists():
        return False
    if layout.current_version() == version:
        return False
    shutil.rmtree(path)
    return True


def recover_dead_run(layout: RootLayout, resuming_version: str, nodes: list[str]) -> str | None:
    """Journal and tidy up after a run that died; returns a note for the result, or None."""
    dead = read_marker(layout)
    if dead is None:
        return None
    staging = clean_stale_staging(layout)
    tidy = [f"removed its staging ({', '.join(staging)})"] if staging else []
    if dead.version != resuming_version and remove_incomplete_release(layout, dead.version):
        tidy.append(f"removed its incomplete release {layout.release(dead.version)}")
    how = "resuming it" if dead.version == resuming_version else f"now running for {resuming_version}"
    detail = f"{dead.describe()} did not finish (the process died); {how}"
    if tidy:
        detail += "; " + "; ".join(tidy)
    journal_action(layout, JournalEntry(dead.action, "interrupted", dead.version, dead.digest,
                                        dead.nodes or nodes, detail), create=True)
    _clear_marker(layout)
    return detail


class Interrupted(KeyboardInterrupt):
    """SIGTERM during a run, raised where the run is so that its clean-up runs."""


def _raise_interrupted(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(f"signal {signal.Signals(signum).name}")


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM unwinds like Ctrl-C (the ansible child is killed, the run's
    marker and staging are removed and the outcome journalled). Main thread only."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def tracked_run(layout: RootLayout, action: str, version: str, digest: str, nodes: list[str]) -> Iterator[list[str]]:
    """Hold a run marker for the block (caller holds the installer lock). Yields the list of
    notes (one if a dead run was found and tidied). A Ctrl-C or SIGTERM inside the block is
    journalled as ``interrupted`` with what to do next, then re-raised."""
    notes: list[str] = []
    note = recover_dead_run(layout, version, nodes)
    if note:
        notes.append(note)
    _write_marker(layout, {"action": action, "version": version, "digest": digest, "pid": os.getpid(),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "previous": layout.current_version(), "nodes": nodes})
    try:
        with terminate_as_interrupt():
            yield notes
    except KeyboardInterrupt as exc:
        current = layout.current_version()
        detail = (f"{action} of {version} stopped by {exc or 'Ctrl-C'}; current is {current or 'none'}; "
                  f"run the same {action} again to resume it"
                  + (", or `sovereign-installer rollback` to go back" if current else ""))
        journal_action(layout, JournalEntry(action, "interrupted", version, digest, nodes, detail), create=True)
        raise
    finally:
        _clear_marker(layout)
