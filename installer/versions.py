"""Release versions: ordering and the installed release's appliance.yaml."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from packaging.version import InvalidVersion, Version

from airgap_bundle.fsutil import write_bytes_atomic
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
    config = read_release_config(layout.release(version)) or fleet_releases(layout).get(version) or {}
    return str(config.get("bundle_digest", ""))


def read_fleet_record(layout: RootLayout) -> dict[str, Any]:
    try:
        record = json.loads(layout.fleet_record.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def fleet_releases(layout: RootLayout) -> dict[str, dict[str, Any]]:
    releases = read_fleet_record(layout).get("releases")
    return {str(k): v for k, v in releases.items() if isinstance(v, dict)} if isinstance(releases, dict) else {}


def record_fleet_release(layout: RootLayout, version: str, digest: str, model: str, nodes: list[str]) -> bool:
    """Note on the installer's machine that ``nodes`` run ``version`` (their roots are elsewhere,
    so there is no `current` here to read it from). Written atomically, and only when it changes,
    so that installing the same release again changes nothing. True when written."""
    record = read_fleet_record(layout)
    releases = fleet_releases(layout)
    releases[version] = {"bundle_digest": digest, "model": model}
    previous = record.get("current")
    wanted = {"current": version, "previous": previous if previous != version else record.get("previous"),
              "nodes": nodes, "releases": dict(sorted(releases.items(), key=lambda kv: version_key(kv[0])))}
    if wanted == record:
        return False
    layout.state.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_bytes_atomic(layout.fleet_record, (json.dumps(wanted, indent=1, sort_keys=True) + "\n").encode(), 0o644)
    return True


def installed_versions(layout: RootLayout) -> list[str]:
    """Complete releases (those with an appliance.yaml), oldest first."""
    if not layout.releases.is_dir():
        return []
    found = [p.name for p in layout.releases.iterdir() if p.is_dir() and (p / "appliance.yaml").is_file()]
    return sorted(found, key=version_key)
