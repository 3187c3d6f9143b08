"""Exceptions of the installer: one root, one subclass per kind of failure, each with the
process exit code the CLI returns for it (scripts rely on these codes)."""

from __future__ import annotations

from typing import Any

EXIT_OK = 0
EXIT_REFUSED = 1  # verification or preflight failure, or a refused release
EXIT_INPUT = 2  # usage or input error (bad inventory, bad arguments, bundle not installable)
EXIT_ANSIBLE = 3  # the playbook failed on a node
EXIT_ROLLED_BACK = 4  # the new release failed on a node, which was rolled back to the previous one
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM during a run (journalled; running the same command again resumes)


class InstallerError(Exception):
    """Root of every error raised by the installer."""

    exit_code = EXIT_REFUSED


class VerificationFailed(InstallerError):
    """The bundle failed verification; nothing was installed. ``report`` says which check."""

    exit_code = EXIT_REFUSED

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report


class PreflightFailed(InstallerError):
    """At least one preflight check failed. ``report`` holds every check."""

    exit_code = EXIT_REFUSED

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report


class ReleaseConflict(InstallerError):
    """The requested release clashes with what is installed (same version from another bundle,
    or a downgrade through upgrade)."""

    exit_code = EXIT_REFUSED


class InputError(InstallerError):
    """Bad arguments or input files."""

    exit_code = EXIT_INPUT


class InventoryError(InputError):
    """The inventory file is missing or invalid."""


class BundleContentError(InputError):
    """The bundle verified but is not an installable release (no model, invalid policies)."""


class NotInstalledError(InputError):
    """The root holds no installed release (or not the one asked for)."""


class InstallerBusy(InputError):
    """Another installer run holds the lock on this root."""


class PkiError(InstallerError):
    """The installation's internal CA (ROOT/state/pki) is unusable: unreadable, corrupt, exposed
    by its file modes or expiring. Nothing was issued or installed."""

    exit_code = EXIT_REFUSED


class AnsibleFailed(InstallerError):
    """ansible-playbook failed. ``result`` is the PlaybookResult with the failed tasks."""

    exit_code = EXIT_ANSIBLE

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.result = result


class RolledBack(AnsibleFailed):
    """A release failed to come up healthy on a node; the node was put back on its previous
    release (running again) and no further node was touched. ``result`` is the PlaybookResult."""

    exit_code = EXIT_ROLLED_BACK


class RuntimeBuildFailed(AnsibleFailed):
    """The runtime could not be built from the release's wheels on a node (a wheel that does not
    fit the node, a missing dependency, ...). Nothing was switched and no half-built runtime is
    left. ``result`` is the PlaybookResult."""
