"""Exceptions of the airgap_bundle package: one root, one subclass per kind of failure.

Messages say what was expected and what was found. They never contain key material or
passphrases: keys are named by key id or file name only.
"""

from __future__ import annotations

from pathlib import Path


class BundleError(Exception):
    """Root of every error raised by airgap_bundle."""


class ModelImportError(BundleError):
    """A model file or directory could not be imported (missing, truncated, unsupported)."""

    def __init__(self, path: Path | str, message: str) -> None:
        self.path = str(path)
        super().__init__(f"{path}: {message}")


class KeyManagementError(BundleError):
    """A key directory is missing, incomplete, or has unsafe permissions."""


class BuildError(BundleError):
    """A bundle could not be built from the given inputs."""


class VerificationError(BundleError):
    """A bundle failed a numbered verification check.

    ``check`` names the check ("3 timestamp signature threshold"), ``path`` the file concerned:
    a member, target or metadata file, or the bundle itself for whole-bundle failures.
    """

    def __init__(self, check: str, message: str, path: str = "") -> None:
        self.check = check
        self.path = path
        where = f" [{path}]" if path else ""
        super().__init__(f"check {check} failed{where}: {message}")


class UnpackError(BundleError):
    """A verified bundle could not be unpacked; nothing was left half-written."""


class TrustStateError(BundleError):
    """The persisted trusted state is unreadable or would move backwards."""
