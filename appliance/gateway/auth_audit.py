"""Failed authentications as audit events, bounded so that a flood of bad keys cannot fill the disk.

Each failure is one ``admin.auth_failed`` record on the ``_admin`` stream (reason code, the key id
when the presented key was well-formed, client address and user agent, method and path; never the
key's secret)
while its client address has written fewer than ``per_client`` records in the current minute and
all clients fewer than ``total``. Failures beyond that are only counted; when the minute is over
(checked on the next request of any kind) one ``admin.auth_failed_summary`` record holds the
number suppressed, per client address for the ``TOP_CLIENTS`` busiest. At most
``total + 1`` records per minute whatever arrives. The same bounds serve other records of
unauthenticated clients (``refusal_audit``), with their own event types (``write_bounded``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from appliance.apikeys import now_utc, ts
from appliance.audit import AuditError, AuditLog

log = logging.getLogger(__name__)
TOP_CLIENTS = 20
MAX_PATH = 200


class AuthFailureAudit:
    def __init__(self, per_client: int = 10, total: int = 200, window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if per_client < 1 or total < per_client or window_s <= 0:
            raise ValueError(f"auth failure audit: expected 1 <= per_client <= total and window_s > 0, found "
                             f"per_client={per_client}, total={total}, window_s={window_s}")
        self.per_client, self.total, self.window_s = per_client, total, window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._start = clock()
        self._started_at = ts(now_utc())
        self._written: Counter[str] = Counter()
        self._suppressed: Counter[str] = Counter()

    def _roll(self, now: float) -> dict[str, Any] | None:
        """Start a new window when the current one is over; returns the old one's summary, if any."""
        if now - self._start < self.window_s:
            return None
        summary = None
        if self._suppressed:
            summary = {"window_start": self._started_at, "window_end": ts(now_utc()),
                       "suppressed": sum(self._suppressed.values()), "clients": len(self._suppressed),
                       "by_client": dict(self._suppressed.most_common(TOP_CLIENTS))}
        self._start, self._started_at = now, ts(now_utc())
        self._written.clear()
        self._suppressed.clear()
        return summary

    def admit(self, client: str) -> tuple[bool, dict[str, Any] | None]:
        """Count one failure of ``client``: ``(write it?, summary of a finished window to write)``."""
        with self._lock:
            summary = self._roll(self._clock())
            if self._written[client] < self.per_client and sum(self._written.values()) < self.total:
                self._written[client] += 1
                return True, summary
            if client in self._suppressed or len(self._suppressed) < 100_000:
                self._suppressed[client] += 1
            else:
                self._suppressed["(other)"] += 1
            return False, summary

    def due(self) -> dict[str, Any] | None:
        """A finished window's summary when one is waiting (cheap when none is)."""
        if not self._suppressed or self._clock() - self._start < self.window_s:
            return None
        with self._lock:
            return self._roll(self._clock())

    @staticmethod
    def write(audit: AuditLog, event: dict[str, Any] | None, summary: dict[str, Any] | None) -> None:
        """Append the records (call in a worker thread). An audit failure is logged, never raised:
        the caller answers 401/403 either way."""
        write_bounded(audit, "admin.auth_failed", "admin.auth_failed_summary", event, summary)


def write_bounded(audit: AuditLog, event_type: str, summary_type: str, event: dict[str, Any] | None,
                  summary: dict[str, Any] | None) -> None:
    """Append a window's summary and/or one event to ``_admin`` (call in a worker thread). The
    event's ``key_id`` names the actor (``anonymous`` without one); its ``tenant`` becomes the
    record's tenant. An audit failure is logged, never raised: the client is answered either way."""
    try:
        if summary is not None:
            audit.append(summary_type, stream="_admin", actor="gateway", data=summary)
        if event is not None:
            key_id = event.get("key_id")
            audit.append(event_type, stream="_admin", actor=f"key:{key_id}" if key_id else "anonymous",
                         tenant=event.get("tenant"), data={k: v for k, v in event.items() if k != "tenant"})
    except AuditError as exc:
        log.error("could not audit %s: %s", event_type, exc)


def short_path(path: str) -> str:
    return path if len(path) <= MAX_PATH else path[:MAX_PATH] + "…"


def failure_event(reason: str, key_id: str | None, client: str, method: str, path: str,
                  tenant: str | None = None, admin: str | None = None, user_agent: str = "") -> dict[str, Any]:
    # "client" is the field's first name, kept for readers of older records; "client_ip" is the
    # name every request record uses
    event: dict[str, Any] = {"reason": reason, "key_id": key_id, "client": client, "client_ip": client,
                             "user_agent": user_agent, "method": method[:16], "path": short_path(path)}
    if tenant is not None:
        event["tenant"] = tenant
    if admin is not None:
        event["admin"] = admin
    return event
