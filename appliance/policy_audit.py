"""Policy changes as audit events: the digest of the policy set in force, compared at each start.

``record_policy_load`` appends ``admin.policy_changed`` (old and new digest, the files, this run's
id) to ``_admin`` when the policy set loaded now differs from the one the previous start loaded
(or none was recorded yet), and then remembers the new digest in ``DATA_DIR/policy-state.json``
(written atomically, after the record is durable: a crash in between records the change again,
never loses it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from appliance.audit import ADMIN_STREAM, AuditLog
from policies import PolicySet

STATE_NAME = "policy-state.json"


def _previous(path: Path) -> str | None:
    try:
        doc: Any = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    digest = doc.get("digest") if isinstance(doc, dict) else None
    return digest if isinstance(digest, str) else None


def record_policy_load(audit: AuditLog, policies: PolicySet, data_dir: Path, run_id: str, actor: str) -> bool:
    """Record the policy set's digest if it changed since the last start; True when it did."""
    path = data_dir / STATE_NAME
    old = _previous(path)
    if old == policies.digest:
        return False
    audit.append("admin.policy_changed", stream=ADMIN_STREAM, actor=actor, data={
        "old_digest": old, "new_digest": policies.digest, "sources": [Path(s).name for s in policies.sources],
        "run_id": run_id})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"digest": policies.digest}))
    os.replace(tmp, path)
    return True
