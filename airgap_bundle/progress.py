"""Progress reporting for long work (hashing, writing, verifying), decoupled from any UI."""

from __future__ import annotations

from typing import Protocol


class ProgressSink(Protocol):
    """Receives byte counts. The CLI renders them as rich progress bars with bytes/s."""

    def begin(self, label: str, total_bytes: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def end(self) -> None: ...


class NullProgress:
    """The default: reports nothing."""

    def begin(self, label: str, total_bytes: int) -> None:
        return None

    def advance(self, nbytes: int) -> None:
        return None

    def end(self) -> None:
        return None
