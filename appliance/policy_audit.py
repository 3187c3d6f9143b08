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

``record_policy_reload`` is for a running gateway that finds the files changed under it
(``gateway/policy_watch.py``): an apply already recorded (the remembered digest is the files'
one) is not recorded again; a change made by other means is ``admin.policy_changed``, once for all
the processes sharing the data directory. ``policy_lock`` serialises all of this across processes
(an exclusive ``flock`` on ``DATA_DIR/policy.lock``): writers of the policy files hold it while
they write and record, so a reader never takes a half-written set for a change.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from appliance.audit import ADMIN_STREAM, AuditLog
from policies import PolicySet

STATE_NAME = "policy-state.json"
LOCK_NAME = "policy.lock"


@contextlib.contextmanager
def policy_lock(data_dir: Path) -> Iterator[None]:
    """Hold the data directory's policy lock (blocking; released when the block ends)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


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


def record_policy_reload(audit: AuditLog, old: PolicySet, new: PolicySet, data_dir: Path, run_id: str) -> bool:
    """Call under ``policy_lock``: record files changed under a running gateway as
    ``admin.policy_changed`` unless that digest was already recorded; True when recorded now."""
    path = data_dir / STATE_NAME
    if _previous(path) == new.digest:
        return False
    audit.append("admin.policy_changed", stream=ADMIN_STREAM, actor="appliance", data={
        "old_digest": old.digest, "new_digest": new.digest, "sources": [Path(s).name for s in new.sources],
        "run_id": run_id, "via": "files changed while running"})
    _remember(path, new.digest)
    return True
