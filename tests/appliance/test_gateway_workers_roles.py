"""What each gateway process runs besides serving (appliance/gateway_roles.py): one retention run
at a time per database (PostgreSQL advisory lock, SQLite lock file), and a run marker of its own
per worker slot."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest
import sqlalchemy as sa

from appliance.audit import AuditLog
from appliance.gateway_roles import PRUNE_LOCK_KEY, LockedPruner, worker_marker_name
from appliance.runmarker import MARKER_NAME
from policies import default_policy_dir, load_policy_set


def test_each_worker_slot_has_its_own_run_marker_and_worker_0_keeps_the_one_process_name() -> None:
    assert worker_marker_name(0) == MARKER_NAME == "appliance.run"
    assert [worker_marker_name(i) for i in (1, 2, 63)] == [
        "appliance.worker1.run", "appliance.worker2.run", "appliance.worker63.run"]
    with pytest.raises(ValueError, match="expected 0 or more, found -1"):
        worker_marker_name(-1)


def test_a_retention_run_is_skipped_while_another_gateway_holds_the_prune_lock(
        postgres_db_url: str, tmp_path: Path) -> None:
    log = AuditLog(postgres_db_url, tmp_path / "audit.key")
    other = sa.create_engine(postgres_db_url, poolclass=sa.pool.NullPool)
    try:
        pruner = LockedPruner(log, load_policy_set(default_policy_dir()))
        with other.connect() as conn:  # another gateway's pruner at work
            assert conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": PRUNE_LOCK_KEY}).scalar()
            skipped = pruner.run_once()
            assert skipped.skipped is not None and "prune lock" in skipped.skipped and skipped.pruned == 0
            conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": PRUNE_LOCK_KEY})
        ran = pruner.run_once()
        assert ran.skipped is None
        with other.connect() as conn:  # and the run let go of the lock
            assert conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": PRUNE_LOCK_KEY}).scalar()
    finally:
        other.dispose()
        log.close()


def test_a_retention_run_on_sqlite_is_skipped_while_another_process_holds_the_prune_lock_file(tmp_path: Path) -> None:
    db = tmp_path / "appliance.db"
    log = AuditLog(f"sqlite:///{db}", tmp_path / "audit.key")
    try:
        pruner = LockedPruner(log, load_policy_set(default_policy_dir()))
        fd = os.open(f"{db}.prune-lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:  # another gateway's pruner (flock is per open file: this descriptor stands for another process)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            skipped = pruner.run_once()
            assert skipped.skipped is not None and "prune lock" in skipped.skipped
        finally:
            os.close(fd)
        assert pruner.run_once().skipped is None
        assert pruner.run_once(dry_run=True).skipped is None
    finally:
        log.close()
