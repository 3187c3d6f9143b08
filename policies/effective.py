"""The policy set in force: the release's files with the applied files laid over them by name.

A release ships its policy files (``policies_dir`` in appliance.yaml: the installed, read-only
``releases/<version>/policies``, or one file). Files applied on site (``appliance policy apply``,
``POST /admin/v1/policies``) live apart from it, in the root's writable data
(``DATA_DIR/policies``, ``applied_policy_dir``), so an upgrade or a rollback never loses them and
never finds the release's files changed. The set in force takes every file of the release, then
every file of the applied directory: one of the same name replaces the release's, the others are
added. Files are loaded in name order, under the paths they really have, so every problem names
the file to fix and the digest is the same wherever it is computed (start, watch, apply, reset,
validate, show, retention).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from policies.errors import PolicyNotFoundError, PolicyValidationError
from policies.loader import load_policy_files, policy_digest
from policies.policy_set import PolicySet

APPLIED_DIR_NAME = "policies"
RELEASE, APPLIED = "release", "applied"


def applied_policy_dir(data_dir: Path) -> Path:
    """Where applied policy files live under a root's data directory."""
    return data_dir / APPLIED_DIR_NAME


@dataclass(frozen=True)
class PolicyFile:
    """One file of the set in force: its name, where it is, and where it comes from."""

    name: str
    path: Path
    origin: str  # RELEASE or APPLIED
    replaces: Path | None = None  # the release's file of the same name it lays over


def _yaml_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def release_files(release: Path) -> dict[str, Path]:
    """name -> path of the release's policy files (a directory's ``*.yaml``/``*.yml``, or one file)."""
    if release.is_file():
        return {release.name: release}
    if not release.is_dir():
        raise PolicyNotFoundError(f"release policies: expected a YAML file or a directory, found nothing at {release}")
    return {p.name: p for p in _yaml_files(release)}


def applied_files(applied: Path | None) -> dict[str, Path]:
    """name -> path of the applied files (none when the directory was never made, or is None)."""
    if applied is None or not applied.exists():
        return {}
    if not applied.is_dir():
        raise PolicyValidationError.single(str(applied), "<applied policies>", "a directory of applied policy files",
                                           "a file (move it away; applied files are kept in a directory)")
    return {p.name: p for p in _yaml_files(applied)}


def files_in_force(release: Path, applied: Path | None) -> list[PolicyFile]:
    """The files of the set in force, in load (name) order."""
    shipped = release_files(release)
    laid = applied_files(applied)
    merged = {name: PolicyFile(name, path, RELEASE) for name, path in shipped.items()}
    for name, path in laid.items():
        merged[name] = PolicyFile(name, path, APPLIED, shipped.get(name))
    return [merged[name] for name in sorted(merged)]


def origin_of(release: Path, applied: Path | None) -> str:
    """How problems that concern no single file name the set."""
    return f"{release} (with {applied} laid over)" if applied_files(applied) else str(release)


def read_in_force(release: Path, applied: Path | None, add: dict[str, bytes] | None = None,
                  remove: frozenset[str] = frozenset()) -> list[tuple[str, bytes]]:
    """(path, bytes) of the set in force, in load order; ``add`` (name -> bytes) laid over it as files
    of the applied directory, and the applied files named in ``remove`` left out, for a check before
    they are written or removed. ``applied`` None: the release alone, ``add`` laid over it as files
    of the release's directory (``appliance policy validate --over``)."""
    files = {f.name: f for f in files_in_force(release, applied)}
    shipped = release_files(release)
    out: dict[str, tuple[str, bytes]] = {}
    for name, file in files.items():
        if file.origin == APPLIED and name in remove:
            if name in shipped:  # the release's file is in force again
                out[name] = (str(shipped[name]), shipped[name].read_bytes())
            continue
        out[name] = (str(file.path), file.path.read_bytes())
    base = applied if applied is not None else release if release.is_dir() else release.parent
    for name, data in (add or {}).items():
        out[name] = (str(base / name), data)
    return [out[name] for name in sorted(out)]


def in_force_digest(release: Path, applied: Path | None) -> str:
    """The digest of the set in force (``PolicySet.digest`` of ``load_in_force``), without validating."""
    return policy_digest(read_in_force(release, applied))


def load_in_force(release: Path, applied: Path | None) -> PolicySet:
    """Load and validate the set in force. Raises PolicyNotFoundError when there is no file at all and
    PolicyValidationError listing every problem (under each file's real path) otherwise."""
    return load_policy_files(read_in_force(release, applied), origin_of(release, applied))
