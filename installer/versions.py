"""Release versions: ordering and the installed release's appliance.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from packaging.version import InvalidVersion, Version

from installer.layout import RootLayout


def version_key(version: str) -> tuple[int, Any]:
    """PEP 440 order where possible; versions that are not PEP 440 sort after, by text."""
    try:
        return (0, Version(version))
    except InvalidVersion:
        return (1, version)


def is_newer(candidate: str, current: str) -> bool:
    a, b = version_key(candidate), version_key(current)
    if a[0] != b[0]:
        return False  # not comparable: refuse to call it newer
    return bool(a[1] > b[1])


def read_release_config(release_dir: Path) -> dict[str, Any] | None:
    """The release's appliance.yaml as a mapping, or None when the release is absent/incomplete."""
    path = release_dir / "appliance.yaml"
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def release_digest(layout: RootLayout, version: str | None) -> str:
    """The bundle digest release ``version`` was installed from ("" when unknown or none)."""
    if not version:
        return ""
    return str((read_release_config(layout.release(version)) or {}).get("bundle_digest", ""))


def installed_versions(layout: RootLayout) -> list[str]:
    """Complete releases (those with an appliance.yaml), oldest first."""
    if not layout.releases.is_dir():
        return []
    found = [p.name for p in layout.releases.iterdir() if p.is_dir() and (p / "appliance.yaml").is_file()]
    return sorted(found, key=version_key)
