"""Import the installer's local journal into the audit log at appliance start.

The installer appends one JSON line per action to ``ROOT/journal/installer.jsonl`` while the
appliance may not be running. Each line becomes an ``installer.<action>`` event in the ``_admin``
audit stream exactly once: the number of imported lines and a hash of those lines are kept in
``ROOT/data/journal-import.json``, so a journal rewritten behind our back is reported, not re-imported.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from appliance.audit import AuditLog
from appliance.errors import ApplianceError


class JournalTamperedError(ApplianceError):
    """Lines of the installer journal that were already imported have changed."""


def import_journal(journal: Path, state_file: Path, audit: AuditLog) -> int:
    if not journal.exists():
        return 0
    state: dict[str, Any] = {"lines": 0, "sha256": hashlib.sha256().hexdigest()}
    if state_file.exists():
        state = json.loads(state_file.read_text())
    lines = journal.read_bytes().splitlines(keepends=True)
    done = int(state["lines"])
    prefix = hashlib.sha256(b"".join(lines[:done])).hexdigest()
    if done > len(lines) or prefix != state["sha256"]:
        raise JournalTamperedError(
            f"{journal}: the first {done} lines were imported with sha256 {state['sha256']}, "
            f"but now hash to {prefix} ({len(lines)} lines present)"
        )
    imported = 0
    for raw in lines[done:]:
        if not raw.endswith(b"\n"):
            break  # a line still being written by a running installer; import it next time
        try:
            entry = json.loads(raw)
        except json.JSONDecodeError:
            entry = {"action": "unparseable", "raw_sha256": hashlib.sha256(raw).hexdigest()}
        action = str(entry.get("action", "unknown"))
        audit.append(f"installer.{action}", stream="_admin", actor=str(entry.get("actor", "installer")),
                     data={"journal": entry})
        imported += 1
        done += 1
        new_state = {"lines": done, "sha256": hashlib.sha256(b"".join(lines[:done])).hexdigest()}
        tmp = state_file.with_name(state_file.name + ".tmp")
        tmp.write_text(json.dumps(new_state))
        os.replace(tmp, state_file)
    return imported
