"""What each gateway process runs besides serving, when several share one database.

Several gateway processes may serve one database: the workers of one host (``appliance serve
--workers N``, ``appliance/workers.py``; worker indexes 0..N-1) and gateways on several hosts
(PostgreSQL). Every one of them serves requests, appends to the audit log (the group-commit
writers take turns: ``audit/writer.py``) and checks its fleet's health. The background jobs that
concern the database as a whole were checked one by one:

- **Retention pruner** (hourly, ``audit/retention.py``): only worker 0 of a host runs it, and each
  run first takes the database's prune lock (PostgreSQL: ``pg_try_advisory_lock(PRUNE_LOCK_KEY)``;
  SQLite: ``flock`` of ``<database file>.prune-lock``): while another gateway's pruner holds it,
  this run is a no-op (its report says so). Two pruners at once
  would not corrupt anything (every batch re-checks its rows), but would record overlapping runs.
- **Witness submission** (``audit.witness_url``): only worker 0 of a host submits. Submitters on
  several hosts are safe (a witness answers a stale submission with 409 and the size it holds,
  and the submitter continues from there), only wasteful.
- **Checkpoint publication** (``audit.publish_dir``): every process publishes the checkpoints it
  signs. Safe: each note file is written atomically, a (tree, size) note is only ever merged
  with the same body (the same log key signs the same root), and ``latest`` never moves back.
- **Crash reconciliation**: per worker, not per database: each worker slot has its own run
  marker (``appliance.run`` for worker 0, as a one-process gateway; ``appliance.worker<i>.run``
  for the others), so a restarted worker closes the requests its dead predecessor left open and
  never those of a live sibling.
- **Journal import, first-admin bootstrap, node sync**: done by whichever process opens first;
  the supervisor starts worker 0 alone and the others once it serves, so they find it done.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa

from appliance.audit.canonical import format_ts
from appliance.audit.retention import Pruner, PruneReport
from appliance.runmarker import MARKER_NAME

if TYPE_CHECKING:
    from appliance.runtime import Runtime

log = logging.getLogger(__name__)
PRUNE_LOCK_KEY = 0x50A7_A0E1  # pg_try_advisory_lock key: one retention run at a time per database


def worker_marker_name(index: int) -> str:
    """The run marker file of worker ``index`` (worker 0 keeps a one-process gateway's name)."""
    if index < 0:
        raise ValueError(f"worker index: expected 0 or more, found {index}")
    return MARKER_NAME if index == 0 else f"appliance.worker{index}.run"


def open_runtime(root: Path, index: int) -> Runtime:
    """``Runtime.open`` for worker ``index``, with that worker's own run marker."""
    from appliance.runtime import Runtime

    return Runtime.open(root, worker=index)


class LockedPruner(Pruner):
    """The retention pruner, one run at a time per database (see module doc): on PostgreSQL under
    an advisory lock, on SQLite under ``flock`` of ``<database file>.prune-lock`` (gateways of
    several install roots may share one file on a host)."""

    def run_once(self, *, dry_run: bool = False) -> PruneReport:
        if dry_run:
            return super().run_once(dry_run=True)
        if self.engine.dialect.name == "sqlite" and self.engine.url.database not in (None, "", ":memory:"):
            return self._under_file_lock(Path(f"{self.engine.url.database}.prune-lock"))
        if self.engine.dialect.name != "postgresql":
            return super().run_once()
        with self.engine.connect() as conn:
            got = conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": PRUNE_LOCK_KEY}).scalar()
            conn.commit()
            if not got:
                return self._skipped()
            try:
                return super().run_once()
            finally:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": PRUNE_LOCK_KEY})
                conn.commit()

    def _under_file_lock(self, path: Path) -> PruneReport:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return self._skipped()
            return super().run_once()  # the lock goes with the descriptor
        finally:
            os.close(fd)

    def _skipped(self) -> PruneReport:
        return PruneReport(False, format_ts(self._now()), self.policies().digest,
                           skipped="another gateway's retention run holds the database's prune lock")


def apply_roles(runtime: Runtime, index: int) -> None:
    """Before ``runtime.start()``: keep or drop the once-per-database jobs of worker ``index``."""
    if index == 0:
        if runtime.pruner is not None:
            runtime.pruner = LockedPruner(runtime.audit, runtime.policies)
        return
    runtime.pruner = None
    submitter = runtime.anchoring.submitter
    if submitter is not None:
        runtime.anchoring.submitter = None
        submitter.stop(5.0)
