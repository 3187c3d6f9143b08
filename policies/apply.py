"""A new policy set as files applied over the set in force: checked first, then written; and reset.

Applied files live in the root's applied directory (``effective.applied_policy_dir``), never in
the release's. ``apply`` semantics: each new file replaces the applied file of the same name or
is added (and so lays over the release's file of that name, if any); files not named stay as they
are (to change a tenant, apply the file that holds it). ``overlay`` validates the set in force
once the files are applied, with the paths they would have, so its digest is the one the next
start computes; ``without`` validates the set once named applied files are removed (``reset``).
``write_policy_files`` writes each file atomically (a temporary file in the same directory,
fsynced, then ``os.replace``, then the directory fsynced); ``remove_policy_files`` removes them;
``restore_policy_files`` puts back what either changed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from policies.effective import applied_files, origin_of, read_in_force
from policies.errors import PolicyNotFoundError, PolicyProblem, PolicyValidationError
from policies.loader import MAX_FILE_BYTES, load_policy_files
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


def overlay(release: Path, applied: Path | None, files: dict[str, bytes]) -> PolicySet:
    """The set in force once ``files`` (name -> contents) are applied (written into ``applied``;
    None: laid over the release's files alone, named as files of its directory).

    Raises PolicyValidationError listing every problem (a new file is named by its path in
    ``applied``, with the lines and columns of its text; the others by their real paths).
    """
    check_file_names(files)
    return load_policy_files(read_in_force(release, applied, add=files), origin_of(release, applied))


def without(release: Path, applied: Path, names: list[str] | None) -> tuple[list[str], PolicySet]:
    """The applied files to remove (``None``: all of them) and the set in force once they are gone.

    Raises PolicyNotFoundError when there is no such applied file, and PolicyValidationError listing
    every problem of the set that would remain (the release's files and the applied files that stay).
    """
    present = applied_files(applied)
    if not present:
        raise PolicyNotFoundError(f"nothing to reset: expected applied policy files in {applied}, found none "
                                  "(the release's policy is in force)")
    if names is None:
        names = sorted(present)
    missing = [name for name in names if name not in present]
    if missing or not names:
        raise PolicyNotFoundError(f"reset: expected applied files among {sorted(present)}, found no "
                                  f"{', '.join(repr(n[:100]) for n in missing) or 'name'}")
    gone = frozenset(names)
    return sorted(gone), load_policy_files(read_in_force(release, applied, remove=gone), origin_of(release, applied))


def write_policy_files(policy_dir: Path, files: dict[str, bytes]) -> dict[str, bytes | None]:
    """Write ``files`` into ``policy_dir``, each atomically; returns what each held before (None: new),
    for ``restore_policy_files``."""
    check_file_names(files)
    if not policy_dir.is_dir():
        policy_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        os.chmod(policy_dir, 0o750)  # whatever the umask: policy is not for every local user to read
    before: dict[str, bytes | None] = {}
    for name in files:
        path = policy_dir / name
        before[name] = path.read_bytes() if path.is_file() else None
    for name, data in files.items():
        _write_atomic(policy_dir / name, data)
    _fsync_dir(policy_dir)
    return before


def remove_policy_files(policy_dir: Path, names: list[str]) -> dict[str, bytes | None]:
    """Remove the named files from ``policy_dir``; returns what each held, for ``restore_policy_files``."""
    before: dict[str, bytes | None] = {name: (policy_dir / name).read_bytes() for name in names}
    for name in names:
        (policy_dir / name).unlink()
    _fsync_dir(policy_dir)
    return before


def restore_policy_files(policy_dir: Path, before: dict[str, bytes | None]) -> None:
    """Put back what ``write_policy_files`` replaced or ``remove_policy_files`` removed (a file that was
    new is removed)."""
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
