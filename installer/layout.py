"""Paths of an appliance root (the contract shared with the appliance) and small helpers."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

JOURNAL_FILE = "installer.jsonl"


@dataclass(frozen=True)
class RootLayout:
    """Where everything lives under ROOT. ``root`` is made absolute, never resolved through
    symlinks, so the paths written into appliance.yaml are the ones the admin chose."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(os.path.abspath(self.root)))

    @property
    def releases(self) -> Path:
        return self.root / "releases"

    @property
    def current(self) -> Path:
        return self.root / "current"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def trust(self) -> Path:
        return self.state / "trust"

    @property
    def pki(self) -> Path:
        """The installation's internal CA and the node certificates it issued (installer side)."""
        return self.state / "pki"

    @property
    def switch_record(self) -> Path:
        return self.state / "switch.json"

    @property
    def journal_dir(self) -> Path:
        return self.root / "journal"

    @property
    def journal(self) -> Path:
        return self.journal_dir / JOURNAL_FILE

    @property
    def staging(self) -> Path:
        return self.root / ".staging"

    @property
    def lock(self) -> Path:
        return self.root / ".installer.lock"

    def release(self, version: str) -> Path:
        return self.releases / version

    @property
    def runtimes(self) -> Path:
        return self.root / "runtimes"

    def runtime(self, runtime_id: str) -> Path:
        """A content-addressed runtime (see installer/runtime.py)."""
        return self.runtimes / runtime_id

    @property
    def fleet_record(self) -> Path:
        """On the installer's machine when no node installs into this root (every node is remote
        or has its own root): the release the nodes run (see installer/versions.py)."""
        return self.state / "fleet.json"

    def current_version(self) -> str | None:
        """The version `current` points at; without a current symlink, the one the fleet record
        names; None when there is neither."""
        if self.current.is_symlink():
            return Path(os.readlink(self.current)).name
        try:
            record = json.loads(self.fleet_record.read_text())
        except (OSError, ValueError):
            return None
        current = record.get("current") if isinstance(record, dict) else None
        return str(current) if current else None


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest existing ancestor (for disk-space and permission checks)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
