"""The exception a numbered verification check raises internally; ``verify_bundle`` turns it into a value."""

from __future__ import annotations


class CheckFailure(Exception):
    """Expected vs found in ``str(self)``; ``path`` names the file concerned ("" = the bundle itself)."""

    def __init__(self, detail: str, path: str = "") -> None:
        self.path = path
        super().__init__(detail)
