from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.audit import AuditLog
from appliance.journal_import import JournalTamperedError, import_journal


def _line(action: str) -> str:
    return json.dumps({"ts": "2026-11-29T00:00:00Z", "actor": "admin", "action": action, "result": "ok"}) + "\n"


def test_journal_lines_are_imported_once_in_order(tmp_path: Path) -> None:
    log = AuditLog(f"sqlite:///{tmp_path / 'a.db'}", tmp_path / "k" / "audit.key")
    journal, state = tmp_path / "installer.jsonl", tmp_path / "state.json"
    journal.write_text(_line("install") + _line("upgrade"))
    assert import_journal(journal, state, log) == 2
    assert import_journal(journal, state, log) == 0
    with journal.open("a") as fh:
        fh.write(_line("rollback") + '{"action": "half-writ')  # the last line is still being written
    assert import_journal(journal, state, log) == 1
    kinds = [r.event_type for r in log.query("_admin", None, None)]
    assert kinds == ["installer.install", "installer.upgrade", "installer.rollback"]
    assert log.verify().ok


def test_rewritten_journal_is_reported_not_reimported(tmp_path: Path) -> None:
    log = AuditLog(f"sqlite:///{tmp_path / 'a.db'}", tmp_path / "k" / "audit.key")
    journal, state = tmp_path / "installer.jsonl", tmp_path / "state.json"
    journal.write_text(_line("install"))
    import_journal(journal, state, log)
    journal.write_text(_line("uninstall"))
    with pytest.raises(JournalTamperedError, match="first 1 lines were imported"):
        import_journal(journal, state, log)
