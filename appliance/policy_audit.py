"""Policy changes as audit events: the digest of the policy set in force, compared at each start.

``record_policy_load`` appends ``admin.policy_changed`` (old and new digest, the files, this run's
id) to ``_admin`` when the policy set loaded now differs from the one the previous start loaded
(or none was recorded yet), and then remembers the new digest in ``DATA_DIR/policy-state.json``
(written atomically, after the record is durable: a crash in between records the change again,
never loses it).

``record_policy_applied`` records a policy applied while running or for the next start
(``appliance policy apply``, ``POST /admin/v1/policies``) as ``admin.policy_applied`` (old and
new digest, who, the files' names, how) and remembers the new digest the same way, so the next
start does not record the same change again as ``admin.policy_changed``.
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
    _remember(path, policies.digest)
    return True


def record_policy_applied(audit: AuditLog, old: PolicySet | str | None, new: PolicySet, files: list[str],
                          data_dir: Path, actor: str, extra: dict[str, Any] | None = None) -> None:
    """Append ``admin.policy_applied`` (durable on return), then remember ``new``'s digest.

    ``old``: the set (or its digest) in force before; ``files``: the names of the files applied;
    ``extra``: how it was applied (``via``, the admin's key id, ``running``), never a secret.
    """
    old_digest = old.digest if isinstance(old, PolicySet) else old
    audit.append("admin.policy_applied", stream=ADMIN_STREAM, actor=actor, data={
        **(extra or {}), "old_digest": old_digest, "new_digest": new.digest, "files": [Path(f).name for f in files],
        "sources": [Path(s).name for s in new.sources]})
    data_dir.mkdir(parents=True, exist_ok=True)
    _remember(data_dir / STATE_NAME, new.digest)


def _remember(path: Path, digest: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"digest": digest}))
    os.replace(tmp, path)
