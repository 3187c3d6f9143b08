"""status: which releases are installed under ROOT, which is current, from which bundle."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from installer.journal import read_entries
from installer.layout import RootLayout
from installer.rollback import installed_versions
from installer.versions import read_release_config


@dataclass(frozen=True)
class ReleaseInfo:
    version: str
    path: str
    bundle_digest: str
    model: str
    current: bool


@dataclass(frozen=True)
class StatusReport:
    root: str
    installed: bool
    current: str | None
    bundle_digest: str | None
    releases: list[ReleaseInfo] = field(default_factory=list)
    last_action: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_status(root: Path) -> StatusReport:
    layout = RootLayout(root)
    current = layout.current_version()
    releases = []
    for version in installed_versions(layout):
        config = read_release_config(layout.release(version)) or {}
        model = config.get("model") if isinstance(config.get("model"), dict) else {}
        releases.append(ReleaseInfo(version=version, path=str(layout.release(version)),
                                    bundle_digest=str(config.get("bundle_digest", "")),
                                    model=str((model or {}).get("name", "")), current=version == current))
    digest = next((r.bundle_digest for r in releases if r.current), None)
    entries = read_entries(layout.journal)
    return StatusReport(root=str(layout.root), installed=current is not None, current=current, bundle_digest=digest,
                        releases=releases, last_action=entries[-1] if entries else None)
