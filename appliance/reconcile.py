"""After an unclean shutdown: record it, and close every request the dead run left open.

``reconcile_unclean(audit, previous, streams, run_id)`` is called by ``Runtime.open`` when the
run marker of a previous run was found (``runmarker.py``), before this run writes anything else:

1. it reads only that run's records (``ts >= previous.started_at``, one indexed range per stream:
   ``_admin`` and the tenants' streams) and collects its ``accepted`` requests (``data.run_id``)
   that have no terminal record (``completed``, ``failed``, ``aborted``, ``rejected``,
   ``abandoned``);
2. appends ``admin.unclean_shutdown`` to ``_admin`` (previous run id, pid, started_at, the ts of
   that run's newest record, how many requests it left open, this run's id);
3. appends one ``abandoned`` record per open request to its tenant's stream (same request id;
   data: the dead run's id, the reason, the seq of its ``accepted`` record);
4. signs a checkpoint of every stream, so the reconciled heads are covered at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from appliance.audit import ADMIN_STREAM, AuditLog, AuditRecord
from appliance.runmarker import RunMarker, RunMarkerError, holder_is_alive, read_marker, write_marker

log = logging.getLogger(__name__)

TERMINAL = frozenset({"completed", "failed", "aborted", "rejected", "abandoned"})


@dataclass(frozen=True)
class Reconciled:
    previous: RunMarker
    last_record_ts: str | None
    abandoned: list[AuditRecord]  # the ``abandoned`` records written

    def summary(self) -> str:
        return (f"previous run {self.previous.run_id} (pid {self.previous.pid}, started {self.previous.started_at}) "
                f"did not stop cleanly; {len(self.abandoned)} open request(s) closed as abandoned")


def open_requests(audit: AuditLog, previous: RunMarker, streams: Iterable[str]) -> tuple[list[AuditRecord], str | None]:
    """The previous run's ``accepted`` records with no terminal record, in stream then seq order,
    and the ts of its newest record of any kind (None when it wrote none)."""
    since = previous.started()
    newest: str | None = None
    left_open: list[AuditRecord] = []
    for stream in dict.fromkeys([ADMIN_STREAM, *streams]):  # each once, _admin first
        pending: dict[str, AuditRecord] = {}
        for record in audit.iter_records(stream, since):
            newest = record.ts if newest is None or record.ts > newest else newest
            if record.request_id is None:
                continue
            if record.event_type == "accepted" and record.data.get("run_id") == previous.run_id:
                pending[record.request_id] = record
            elif record.event_type in TERMINAL:
                pending.pop(record.request_id, None)
        left_open.extend(pending.values())
    return left_open, newest


def reconcile_unclean(audit: AuditLog, previous: RunMarker, streams: Iterable[str], run_id: str) -> Reconciled:
    left_open, newest = open_requests(audit, previous, streams)
    audit.append("admin.unclean_shutdown", stream=ADMIN_STREAM, actor="appliance", data={
        "previous_run_id": previous.run_id, "previous_pid": previous.pid, "previous_started_at": previous.started_at,
        "last_record_ts": newest, "open_requests": len(left_open), "run_id": run_id})
    reason = f"gateway stopped uncleanly (previous run {previous.run_id})"
    written = [
        audit.append("abandoned", stream=rec.stream, actor="appliance", tenant=rec.tenant, request_id=rec.request_id,
                     data={"run_id": previous.run_id, "reason": reason, "accepted_seq": rec.seq})
        for rec in left_open
    ]
    audit.checkpoint()
    return Reconciled(previous, newest, written)


def begin_run(audit: AuditLog, streams: Callable[[], Iterable[str]], path: Path, run: RunMarker) -> Reconciled | None:
    """Reconcile the previous run when its marker at ``path`` is still there, then write ``run``'s
    marker. ``streams``: the tenant streams to look in (asked only when there is a previous run).

    The marker is written after the reconciliation: a crash during it leaves the old marker, and
    the next start finishes the job (requests already closed are not closed twice)."""
    done: Reconciled | None = None
    try:
        previous = read_marker(path)
    except ValueError as exc:  # a marker we cannot read still says the last run did not stop cleanly
        audit.append("admin.unclean_shutdown", stream=ADMIN_STREAM, actor="appliance", data={
            "marker_error": str(exc)[:300], "open_requests": None, "run_id": run.run_id})
        audit.checkpoint()
        log.warning("unreadable run marker %s (%s): recorded an unclean shutdown; the open requests of that run "
                    "cannot be told apart and stay open", path, exc)
        previous = None
    if previous is not None:
        if holder_is_alive(previous):
            raise RunMarkerError(
                f"another appliance (pid {previous.pid}, run {previous.run_id}, started {previous.started_at}) is "
                f"serving from {path.parent}: expected no live gateway on this data directory; stop it first")
        done = reconcile_unclean(audit, previous, streams(), run.run_id)
        log.warning("%s", done.summary())
    write_marker(path, run)
    return done
