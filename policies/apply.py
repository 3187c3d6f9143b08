"""A new policy set as files laid over the policy directory in force: checked first, then written.

``apply`` semantics: each new file replaces the file of the same name in the policy directory, or
is added to it; files not named stay as they are (to change a tenant, apply the file that holds
it). ``overlay`` validates the set the directory would then hold, with the paths it would have, so
its digest is the one the next start computes. ``write_policy_files`` writes each file atomically
(a temporary file in the same directory, fsynced, then ``os.replace``, then the directory fsynced).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from policies.errors import PolicyProblem, PolicyValidationError
from policies.loader import MAX_FILE_BYTES, load_policy_files, read_policy_files
from policies.policy_set import PolicySet

FILE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}\.ya?ml$"
MAX_FILES = 64
_FILE_NAME = re.compile(FILE_NAME_PATTERN)


def check_file_names(files: dict[str, bytes]) -> None:
    """Refuse names that are not plain policy file names (no path, ``.yaml``/``.yml``) and sizes over the limit."""
    problems = []
    if not files:
        problems.append(PolicyProblem("<apply>", "files", "at least one policy file", "none"))
    if len(files) > MAX_FILES:
        problems.append(PolicyProblem("<apply>", "files", f"at most {MAX_FILES} files", str(len(files))))
    for name, data in files.items():
        if not _FILE_NAME.fullmatch(name):
            problems.append(PolicyProblem(name[:100], "<file name>",
                                          "a plain file name ending in .yaml or .yml (letters, digits, '.', '_', '-')",
                                          repr(name[:100])))
        elif len(data) > MAX_FILE_BYTES:
            problems.append(PolicyProblem(name, "<file>", f"at most {MAX_FILE_BYTES} bytes", str(len(data))))
        elif _empty(data):  # an empty body is a mistake far more often than a wish to empty a file
            problems.append(PolicyProblem(name, "<file>", "at least one section (to empty a file, apply "
                                          "its sections empty, e.g. 'tenants: {}')", "no section", 1, 1))
    if problems:
        raise PolicyValidationError(problems)


def _empty(data: bytes) -> bool:
    try:
        return yaml.safe_load(data) in (None, {})
    except yaml.YAMLError:
        return False  # the loader reports it, with its line and column


def overlay(policy_dir: Path, files: dict[str, bytes]) -> PolicySet:
    """The policy set ``policy_dir`` holds once ``files`` (name -> contents) are laid over it.

    Raises PolicyValidationError listing every problem (file names are the paths in
    ``policy_dir``, lines and columns those of the new files' text).
    """
    check_file_names(files)
    if policy_dir.exists() and not policy_dir.is_dir():
        raise PolicyValidationError.single(str(policy_dir), "policies_dir", "a directory of policy files to apply to",
                                           "a single file (replace it by its directory)")
    current = dict(read_policy_files(policy_dir)) if policy_dir.is_dir() and any(
        p.suffix in (".yaml", ".yml") for p in policy_dir.iterdir()) else {}
    merged = {**current, **{str(policy_dir / name): data for name, data in files.items()}}
    ordered = sorted(merged.items(), key=lambda item: Path(item[0]).name)  # the loader's order on disk
    return load_policy_files(ordered, str(policy_dir))


def write_policy_files(policy_dir: Path, files: dict[str, bytes]) -> dict[str, bytes | None]:
    """Write ``files`` into ``policy_dir``, each atomically; returns what each held before (None: new),
    for ``restore_policy_files``."""
    check_file_names(files)
    policy_dir.mkdir(parents=True, exist_ok=True)
    before: dict[str, bytes | None] = {}
    for name in files:
        path = policy_dir / name
        before[name] = path.read_bytes() if path.is_file() else None
    for name, data in files.items():
        _write_atomic(policy_dir / name, data)
    _fsync_dir(policy_dir)
    return before


def restore_policy_files(policy_dir: Path, before: dict[str, bytes | None]) -> None:
    """Put back what ``write_policy_files`` replaced (a file that was new is removed)."""
    for name, data in before.items():
        if data is None:
            (policy_dir / name).unlink(missing_ok=True)
        else:
            _write_atomic(policy_dir / name, data)
    _fsync_dir(policy_dir)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
