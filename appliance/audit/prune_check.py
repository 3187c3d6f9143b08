"""Is every pruned record accounted for by a signed prune record?

The chain walk skips the hash recomputation of a pruned record (its body is gone), so it cannot
tell an honest prune from an insider who empties a record's ``data`` and stamps ``pruned_at``.
Retention writes, before it prunes anything, a signed ``admin.audit_prune_started`` on ``_admin``
naming the tenant, the seq range and the ``pruned_at`` it stamps (``retention.py``). A pruned
record outside every such range of its tenant, or with another ``pruned_at``, was not pruned by
retention. Imports nothing that imports the log, so database verification can call it.
"""

from __future__ import annotations

import json

from sqlalchemy import Connection, select

from appliance.audit.chain import ChainFailure
from appliance.audit.record import ADMIN_STREAM
from appliance.audit.schema import audit_events

PRUNE_STARTED = "admin.audit_prune_started"


def unaccounted_prunes(conn: Connection, stream: str | None = None, *, limit: int = 10) -> list[ChainFailure]:
    """Up to ``limit`` pruned records (of ``stream``, or of every stream) that no signed
    ``admin.audit_prune_started`` accounts for, as failures of the check ``pruned``."""
    ev = audit_events.c
    ranges: dict[tuple[str, str], list[tuple[int, int]]] = {}
    intents = select(ev.tenant, ev.data).where(ev.stream == ADMIN_STREAM, ev.event_type == PRUNE_STARTED)
    for intent in conn.execute(intents):
        try:
            data = json.loads(intent.data)
            key = (str(intent.tenant), str(data["pruned_at"]))
            span = (int(data["first_seq"]), int(data["last_seq"]))
        except (ValueError, KeyError, TypeError):
            continue  # a malformed (or itself pruned) intent accounts for nothing
        ranges.setdefault(key, []).append(span)
    pruned = select(ev.stream, ev.seq, ev.pruned_at).where(ev.pruned_at.is_not(None)).order_by(ev.stream, ev.seq)
    if stream is not None:
        pruned = pruned.where(ev.stream == stream)
    failures: list[ChainFailure] = []
    for row in conn.execute(pruned).yield_per(5000):
        if not any(a <= row.seq <= b for a, b in ranges.get((row.stream, row.pruned_at), ())):
            failures.append(ChainFailure(
                row.stream, row.seq, "pruned", f"a signed {PRUNE_STARTED} covering it (pruned_at {row.pruned_at})",
                "none: the body was removed outside retention"))
            if len(failures) >= limit:
                break
    return failures
