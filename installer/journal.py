"""The installer journal: one JSON line per installer action in ROOT/journal/installer.jsonl.

The appliance imports these lines into its audit log at first start. Each line is appended
with O_APPEND and made durable (flush + fsync) before the action is reported done.
Fields: ts (UTC ISO 8601), actor (login name), action, version, bundle_digest, nodes, result
(ok | failed | refused), detail.
"""

from __future__ import annotations

import getpass
import json
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from installer.layout import RootLayout

JOURNAL_FILE_MODE = 0o640
JOURNAL_DIR_MODE = 0o750
RESULTS = ("ok", "failed", "refused", "interrupted")
MAX_DETAIL_CHARS = 4000


def _actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


@dataclass(frozen=True)
class JournalEntry:
    action: str
    result: str
    version: str = ""
    bundle_digest: str = ""
    nodes: list[str] = field(default_factory=list)
    detail: str = ""
    actor: str = field(default_factory=_actor)
    ts: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))

    def __post_init__(self) -> None:
        if self.result not in RESULTS:
            raise ValueError(f"JournalEntry.result: expected one of {RESULTS}, found {self.result!r}")
        if len(self.detail) > MAX_DETAIL_CHARS:
            object.__setattr__(self, "detail", self.detail[: MAX_DETAIL_CHARS - 3] + "...")
        if not self.action:
            raise ValueError("JournalEntry.action: expected a non-empty action name, found ''")

    def outcome(self, result: str, detail: str) -> JournalEntry:
        """This action's entry with its result and detail, stamped now (when it ended)."""
        return JournalEntry(self.action, result, self.version, self.bundle_digest, list(self.nodes), detail)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {k: data[k] for k in ("ts", "actor", "action", "version", "bundle_digest", "nodes", "result", "detail")}


def append_entry(journal: Path, entry: JournalEntry, *, create_dir: bool = True) -> None:
    """Append ``entry`` as one line and fsync it. With ``create_dir=False`` the journal
    directory must already exist (used where nothing new may be created on disk)."""
    directory = journal.parent
    if not directory.is_dir():
        if not create_dir:
            raise FileNotFoundError(f"journal directory {directory} does not exist")
        directory.mkdir(mode=JOURNAL_DIR_MODE, parents=True, exist_ok=True)
    line = (json.dumps(entry.to_dict(), sort_keys=False, separators=(",", ":")) + "\n").encode()
    created = not journal.exists()
    fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, JOURNAL_FILE_MODE)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def read_entries(journal: Path) -> list[dict[str, Any]]:
    """Every entry in the journal (a torn last line, if any, is skipped)."""
    if not journal.is_file():
        return []
    entries = []
    for line in journal.read_text().splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            entries.append(value)
    return entries


def journal_action(layout: RootLayout, entry: JournalEntry, *, create: bool) -> None:
    """Append to ROOT's journal; with ``create=False`` only where a journal directory exists."""
    if create or layout.journal_dir.is_dir():
        append_entry(layout.journal, entry, create_dir=create)
