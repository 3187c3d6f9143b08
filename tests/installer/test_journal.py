from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from installer import JournalEntry, append_entry, read_entries


def test_append_and_read(tmp_path: Path) -> None:
    journal = tmp_path / "journal" / "installer.jsonl"
    append_entry(journal, JournalEntry("install", "ok", "0.1.0", "sha256:" + "0" * 64, ["local"], "done"))
    append_entry(journal, JournalEntry("rollback", "failed", "0.0.9", detail="x" * 10000))
    lines = journal.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line) for line in lines)
    entries = read_entries(journal)
    assert entries[0]["nodes"] == ["local"] and entries[0]["ts"].endswith("Z")
    assert len(entries[1]["detail"]) == 4000
    assert stat.S_IMODE(journal.stat().st_mode) == 0o640
    assert stat.S_IMODE(journal.parent.stat().st_mode) == 0o750


def test_no_directory_created_when_asked_not_to(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        append_entry(tmp_path / "journal" / "installer.jsonl", JournalEntry("install", "refused"),
                     create_dir=False)
    assert not (tmp_path / "journal").exists()


def test_torn_last_line_is_skipped(tmp_path: Path) -> None:
    journal = tmp_path / "installer.jsonl"
    append_entry(journal, JournalEntry("install", "ok"))
    with journal.open("a") as f:
        f.write('{"ts": "2026-')
    assert len(read_entries(journal)) == 1


def test_entry_validates() -> None:
    with pytest.raises(ValueError, match="expected one of"):
        JournalEntry("install", "maybe")
