"""The OCSF rendering of an export (``--format ocsf``): one API Activity event per record.

OCSF 1.1.0, class API Activity (``class_uid`` 6003, category Application Activity, 6), one JSON
object per line (canonical JSON), for a SIEM. The mapping:

- ``time``: the record's ts in milliseconds since the epoch; ``metadata.logged_time`` the same.
- ``activity_id``: a tenant request event (accepted, completed, failed, aborted, rejected,
  abandoned, retried) is 1 Create -- each is a stage of one ``POST`` that creates a completion. An
  ``admin.*`` / ``installer.*`` event by the verb its name ends with: ``*_created``,
  ``*_issued``, ``*_added``, ``*_started`` 1 Create; ``*_exported``, ``*_verified``,
  ``*_viewed``, ``*_read``, ``*_listed`` 2 Read; ``*_updated``, ``*_changed``, ``*_rotated``,
  ``*_migrated``, ``*_drained``/``*_draining``, ``*_undrained``, ``*_released``, ``*_disabled``,
  ``*_enabled`` 3 Update; ``*_revoked``, ``*_removed``, ``*_deleted``, ``*_pruned``,
  ``*_shredded``, ``*_stopped`` 4 Delete; anything else (``auth_failed``, ``unclean_shutdown``,
  ``installer.<action>``, ...) 99 Other.
  ``type_uid`` = 600300 + activity_id.
- ``status_id``/``status``: accepted and completed 1 Success; failed, aborted, rejected and
  abandoned 2 Failure; retried 99 Other (one node failed, the request went on elsewhere;
  ``status_detail`` says so); ``*auth_failed*`` and ``*refused*`` admin events 2 Failure;
  other admin events by ``data.result`` (text starting "fail" or "refused", or ``false``: 2), else 1 Success
  (the action was recorded as done). ``severity_id`` 1 Informational, 2 Low for failures.
- ``actor.user.uid``: the record's actor (a key id such as ``key:k1``, an admin, ``cli:<user>``).
- ``src_endpoint.ip`` / ``http_request.user_agent``: the record's ``data.client_ip`` /
  ``data.user_agent`` when present.
- ``api.operation``: the event type; ``api.request.uid``: the request id.
- ``metadata.uid``: the request id (absent when the record has none); ``metadata.sequence``:
  the record's seq; ``metadata.log_name``: the stream; ``metadata.product``: name and vendor;
  ``metadata.version``: "1.1.0".
- ``cloud.provider``: "on-premises" (the class requires a cloud object; nothing leaves the box).
- ``unmapped``: everything else -- stream, seq, tenant, prev_hash, hash, pruned_at and the
  rest of ``data`` -- so nothing of the record is lost.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from appliance.audit.canonical import canonical_json
from appliance.audit.record import REQUEST_EVENT_TYPES, AuditRecord

OCSF_VERSION = "1.1.0"
CLASS_UID, CATEGORY_UID = 6003, 6
PRODUCT = {"name": "Sovereign Inference Appliance", "vendor_name": "Sovereign Appliance"}
ACTIVITY_NAMES = {0: "Unknown", 1: "Create", 2: "Read", 3: "Update", 4: "Delete", 99: "Other"}
_VERBS = (
    (1, ("created", "issued", "added", "started")),
    (2, ("exported", "verified", "viewed", "read", "listed")),
    (3, ("updated", "changed", "rotated", "migrated", "drained", "draining", "undrained", "released", "disabled",
         "enabled")),
    (4, ("revoked", "removed", "deleted", "pruned", "shredded", "stopped")),
)
_REQUEST_FAILURES = frozenset({"failed", "aborted", "rejected", "abandoned"})
_REQUEST_OTHER = frozenset({"retried"})
STATUS_NAMES = {1: "Success", 2: "Failure", 99: "Other"}
_MAPPED_DATA = ("client_ip", "user_agent")


def activity_id(event_type: str) -> int:
    if event_type in REQUEST_EVENT_TYPES:
        return 1
    last = event_type.rsplit(".", 1)[-1]
    for number, verbs in _VERBS:
        if any(last == verb or last.endswith("_" + verb) for verb in verbs):
            return number
    return 99


def status_id(event_type: str, data: dict[str, Any]) -> int:
    if event_type in REQUEST_EVENT_TYPES:
        return 2 if event_type in _REQUEST_FAILURES else 99 if event_type in _REQUEST_OTHER else 1
    if "auth_failed" in event_type or "refused" in event_type:
        return 2
    result = data.get("result")
    if (isinstance(result, str) and result.lower().startswith(("fail", "refused"))) or result is False:
        return 2
    return 1


def _ms(ts: str) -> int:
    moment = datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def ocsf_event(record: AuditRecord, pruned_at: str | None) -> dict[str, Any]:
    activity = activity_id(record.event_type)
    status = status_id(record.event_type, record.data)
    time_ms = _ms(record.ts)
    event: dict[str, Any] = {
        "class_uid": CLASS_UID, "class_name": "API Activity",
        "category_uid": CATEGORY_UID, "category_name": "Application Activity",
        "activity_id": activity, "activity_name": ACTIVITY_NAMES[activity],
        "type_uid": CLASS_UID * 100 + activity, "type_name": f"API Activity: {ACTIVITY_NAMES[activity]}",
        "time": time_ms,
        "severity_id": 2 if status == 2 else 1, "severity": "Low" if status == 2 else "Informational",
        "status_id": status, "status": STATUS_NAMES[status],
        "actor": {"user": {"uid": record.actor}},
        "api": {"operation": record.event_type},
        "cloud": {"provider": "on-premises"},
        "metadata": {"version": OCSF_VERSION, "product": dict(PRODUCT), "log_name": record.stream,
                     "sequence": record.seq, "logged_time": time_ms},
    }
    if status == 99:
        event["status_detail"] = "attempt on one node failed; the request was retried on another"
    if record.request_id is not None:
        event["metadata"]["uid"] = record.request_id
        event["api"]["request"] = {"uid": record.request_id}
    client_ip, user_agent = record.data.get("client_ip"), record.data.get("user_agent")
    if isinstance(client_ip, str) and client_ip:
        event["src_endpoint"] = {"ip": client_ip}
    if isinstance(user_agent, str) and user_agent:
        event["http_request"] = {"user_agent": user_agent}
    rest = {k: v for k, v in record.data.items() if k not in _MAPPED_DATA or not isinstance(v, str) or not v}
    unmapped: dict[str, Any] = {"stream": record.stream, "seq": record.seq, "tenant": record.tenant,
                                "prev_hash": record.prev_hash, "hash": record.hash, "data": rest}
    if pruned_at is not None:
        unmapped["pruned_at"] = pruned_at
    event["unmapped"] = unmapped
    return event


def ocsf_line(record: AuditRecord, pruned_at: str | None) -> bytes:
    return (canonical_json(ocsf_event(record, pruned_at)) + "\n").encode("utf-8")
