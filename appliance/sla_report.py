"""The SLA report of one tenant for one UTC month, computed from its audit records.

The log is the record: every number comes from the tenant's stream, never from metrics.

- A request that ran ends in a ``completed``, ``failed`` or ``aborted`` record; it counts in the
  month of that record, under the SLA class of its ``accepted`` record (the tenant's class in
  the policy in force when its ``accepted`` record lies in an earlier month).
- A ``rejected`` record is a request refused before it ran, counted by ``status code``, under the
  tenant's class in the policy in force (a refusal does not record a class).
- TTFT is the record's ``ttft_ms``; TPOT is ``(latency_ms - ttft_ms) / (completion_tokens - 1)``
  for a request that produced more than one token.
- Percentiles are nearest-rank: the ``ceil(p / 100 * n)``-th smallest of ``n`` values, so every
  reported number is one a request really had.
- A request met its SLO when it completed with TTFT at or under the class's target and, when
  the class has a TPOT target and the request a TPOT, TPOT at or under it (``sla_metrics``'s
  rule). Attainment = met / requests that ran; the class's objective holds when attainment is
  at least its percentile. Goodput = met requests per second of the period (up to the report's
  time for the month in progress).
- Targets are those of the policy in force when the report is made; the report lists every
  policy digest in force during the month (from ``admin.policy_changed`` and
  ``admin.policy_applied`` records) so a reader sees when targets may have differed.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from appliance.audit.record import AuditRecord
from appliance.errors import ApplianceError
from appliance.sla_metrics import slo_result
from policies import PolicySet

REPORT_TYPE = "sovereign-sla-report/1"
PERCENTILES = (50, 90, 99)
ENDED = ("completed", "failed", "aborted")
POLICY_EVENTS = ("admin.policy_changed", "admin.policy_applied")
_PERIOD = re.compile(r"^(\d{4})-(\d{2})$")


class SlaReportError(ApplianceError):
    """The report cannot be made as asked (bad period, unknown tenant, unreadable log)."""


@dataclass(frozen=True)
class Period:
    """A UTC calendar month: ``since`` inclusive, ``until`` exclusive."""

    name: str
    since: datetime
    until: datetime

    @classmethod
    def parse(cls, text: str) -> Period:
        match = _PERIOD.match(text)
        month = int(match.group(2)) if match else 0
        if match is None or not 1 <= month <= 12 or int(match.group(1)) < 1970:
            raise SlaReportError(f"period: expected a UTC month as YYYY-MM (e.g. 2026-12), found {text!r}")
        year = int(match.group(1))
        since = datetime(year, month, 1, tzinfo=UTC)
        until = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
        return cls(text, since, until)

    def seconds(self, now: datetime) -> float:
        """Length of the period as far as it has happened at ``now``."""
        return max(0.0, (min(self.until, now) - self.since).total_seconds())


def nearest_rank(values: list[float], p: float) -> float | None:
    """The nearest-rank ``p``-th percentile of ``values`` (``None`` when there are none)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p / 100.0 * len(ordered))) - 1]


@dataclass
class _ClassTally:
    requests: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    missed: Counter[str] = field(default_factory=Counter)
    met: int = 0
    ttft_ms: list[float] = field(default_factory=list)
    tpot_ms: list[float] = field(default_factory=list)
    met_by_day: Counter[str] = field(default_factory=Counter)
    ran_by_day: Counter[str] = field(default_factory=Counter)


def _tpot_ms(data: dict[str, Any]) -> float | None:
    ttft, latency, tokens = data.get("ttft_ms"), data.get("latency_ms"), data.get("completion_tokens")
    if not isinstance(ttft, int | float) or not isinstance(latency, int | float) or not isinstance(tokens, int):
        return None
    if tokens <= 1:
        return None
    return (latency - ttft) / (tokens - 1)


def compute_report(tenant: str, period: Period, records: Iterable[AuditRecord], policies: PolicySet,
                   policy_records: Iterable[AuditRecord], now: datetime) -> dict[str, Any]:
    """The report as a JSON-ready dict. ``records``: the tenant's stream, from before the period
    (for ``accepted`` records of requests that end in it) to its end; ``policy_records``: the
    ``_admin`` stream up to the period's end."""
    default_class = policies.tenant_policy(tenant).sla_class
    since, until = period.since.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), period.until.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    class_of: dict[str, str] = {}
    tallies: dict[str, _ClassTally] = {}
    for record in records:
        if record.event_type == "accepted" and record.request_id is not None:
            class_of[record.request_id] = str(record.data.get("sla_class") or default_class)
        if not since <= record.ts < until:
            continue
        if record.event_type == "rejected":
            tally = tallies.setdefault(default_class, _ClassTally())
            tally.requests += 1
            tally.rejected[f"{record.data.get('status', '?')} {record.data.get('code', 'unknown')}"] += 1
        elif record.event_type in ENDED:
            name = class_of.pop(record.request_id or "", default_class)
            tally = tallies.setdefault(name, _ClassTally())
            _count_ended(tally, record, policies.sla_classes.get(name))
    seconds = period.seconds(now)
    classes = {name: _summary(name, tally, policies, seconds) for name, tally in sorted(tallies.items())}
    return {
        "type": REPORT_TYPE, "tenant": tenant, "period": {"month": period.name, "since": since, "until": until},
        "created": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "period_seconds": seconds,
        "tenant_class_now": default_class, "policy": _policy_digests(policy_records, since, policies.digest),
        "percentile_method": "nearest-rank", "classes": classes,
    }


def _count_ended(tally: _ClassTally, record: AuditRecord, sla: Any) -> None:
    data = record.data
    tally.requests += 1
    tally.outcomes[record.event_type] += 1
    ttft = data.get("ttft_ms")
    tpot = _tpot_ms(data)
    if record.event_type == "completed" and isinstance(ttft, int | float):
        tally.ttft_ms.append(float(ttft))
        if tpot is not None:
            tally.tpot_ms.append(tpot)
    day = record.ts[:10]
    tally.ran_by_day[day] += 1
    if sla is None:  # a class no longer in the policy: no targets to judge against
        tally.missed["class_not_in_policy"] += 1
        return
    result = slo_result(record.event_type, None if not isinstance(ttft, int | float) else ttft / 1000.0,
                        None if tpot is None else tpot / 1000.0, sla.ttft_ms / 1000.0,
                        None if sla.tpot_ms is None else sla.tpot_ms / 1000.0)
    if result == "met":
        tally.met += 1
        tally.met_by_day[day] += 1
    else:
        tally.missed[result] += 1


def _summary(name: str, tally: _ClassTally, policies: PolicySet, seconds: float) -> dict[str, Any]:
    sla = policies.sla_classes.get(name)
    ran = sum(tally.outcomes.values())
    attainment = None if ran == 0 else tally.met / ran
    targets = None if sla is None else {"ttft_ms": sla.ttft_ms, "tpot_ms": sla.tpot_ms,
                                        "percentile": sla.percentile, "priority": sla.priority,
                                        "deadline_ms": sla.deadline_ms}
    objective = None
    if sla is not None and attainment is not None:
        objective = {
            "attainment_needed": sla.percentile / 100.0, "met": attainment >= sla.percentile / 100.0,
            "ttft_at_percentile_ms": nearest_rank(tally.ttft_ms, sla.percentile),
            "tpot_at_percentile_ms": nearest_rank(tally.tpot_ms, sla.percentile),
        }
    days = sorted(tally.ran_by_day)
    return {
        "targets": targets, "requests": tally.requests, "ran": ran,
        "completed": tally.outcomes["completed"], "failed": tally.outcomes["failed"],
        "aborted": tally.outcomes["aborted"], "rejected": sum(tally.rejected.values()),
        "rejected_by_code": dict(sorted(tally.rejected.items())),
        "ttft_ms": {f"p{p}": nearest_rank(tally.ttft_ms, p) for p in PERCENTILES},
        "tpot_ms": {f"p{p}": nearest_rank(tally.tpot_ms, p) for p in PERCENTILES},
        "slo_met": tally.met, "slo_missed_by_reason": dict(sorted(tally.missed.items())),
        "attainment": attainment, "objective": objective,
        "goodput_rps": None if seconds <= 0 else tally.met / seconds,
        "attainment_by_day": {day: tally.met_by_day[day] / tally.ran_by_day[day] for day in days},
    }


def _policy_digests(records: Iterable[AuditRecord], since: str, current: str) -> dict[str, Any]:
    """The digest in force when the period began and every change recorded during it."""
    at_start: str | None = None
    changes: list[dict[str, Any]] = []
    for record in records:
        if record.event_type not in POLICY_EVENTS:
            continue
        digest = record.data.get("new_digest")
        if record.ts < since:
            at_start = digest
        else:
            changes.append({"ts": record.ts, "event": record.event_type, "old_digest": record.data.get("old_digest"),
                            "new_digest": digest})
    in_force = [d for d in [at_start, *(c["new_digest"] for c in changes)] if d]
    return {"at_start": at_start, "changes": changes, "in_force": list(dict.fromkeys(in_force)),
            "targets_from": current, "targets_were_in_force": current in in_force}
