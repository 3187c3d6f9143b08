"""Persisted trusted state for rollback protection: last verified versions and root.

Layout of STATE_DIR (0700)::

    trusted_state.json   {"root": N, "timestamp": N, "snapshot": N, "targets": N,
                          "timestamp_sha256": hex, "name": ..., "version": ..., "digest": ...}
    root.json            the last verified root (the chain start for the next verification)

``verify_bundle`` only reads this state; ``commit_trust`` writes it (atomically), after the
caller has decided to act on a verified bundle. ``unpack_bundle`` does not commit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import TrustStateError
from .fsutil import write_bytes_atomic, write_json_atomic
from .report import VerificationReport

STATE_FILE = "trusted_state.json"
ROOT_FILE = "root.json"
VERSIONED_ROLES = ("root", "timestamp", "snapshot", "targets")


def load_state(state_dir: Path) -> dict[str, Any]:
    """The persisted state, or {} when none was committed yet."""
    path = Path(state_dir) / STATE_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TrustStateError(f"{path}: expected trusted state JSON, found unreadable data: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(data.get(r), int) for r in VERSIONED_ROLES):
        raise TrustStateError(f"{path}: expected integer versions for {VERSIONED_ROLES}, found {data!r}")
    return data


def load_state_root(state_dir: Path) -> bytes | None:
    path = Path(state_dir) / ROOT_FILE
    return path.read_bytes() if path.is_file() else None


def commit_trust(report: VerificationReport, state_dir: Path) -> Path:
    """Persist the verified versions and root of ``report``; refuses a failed report or a rollback."""
    if not report.ok:
        raise TrustStateError("expected a verification report with every check passed, found a failed report")
    state_dir = Path(state_dir)
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    old = load_state(state_dir)
    for role in VERSIONED_ROLES:
        if old and report.versions[role] < old[role]:
            raise TrustStateError(
                f"{state_dir}: expected {role} version >= {old[role]} (trusted state), found {report.versions[role]}"
            )
    if not old or report.versions["root"] >= old["root"]:
        write_bytes_atomic(state_dir / ROOT_FILE, report.trusted_root)
    state: dict[str, object] = {role: report.versions[role] for role in VERSIONED_ROLES}
    state.update({"timestamp_sha256": report.timestamp_sha256, "name": report.name, "version": report.version,
                  "digest": report.digest})
    write_json_atomic(state_dir / STATE_FILE, state)
    return state_dir / STATE_FILE
