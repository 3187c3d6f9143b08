"""Every refused request (a 4xx answer) is an audit record, whoever refused it (AU-2/AU-3).

Most refusals are recorded where they are decided, with their reasons: failed authentication
(``auth.py``: ``admin.auth_failed``), the service's refusals (``rejected``), a request cut off
after admission (its ``completed``/``failed``/``aborted`` record). Those mark the request as
recorded (``mark_recorded``). ``RefusalAuditMiddleware`` records the rest from the answer itself
(status, error code and message of the OpenAI envelope), before the answer's last byte is sent:

- a tenant key's request: ``rejected`` in the tenant's stream (actor ``key:<id>``);
- an admin key's request: ``admin.request_refused`` in ``_admin`` (actor ``admin:<name>``);
- a request refused before its key was checked or without a valid key (the edge's 429
  ``refusal_budget_exceeded``, a 413/400 on its Content-Length, an unknown route):
  ``admin.request_refused`` in ``_admin`` (actor ``anonymous``; a presented key id is recorded as
  ``claimed_key_id``, never verified), bounded per client address like failed authentications
  (``auth_audit.AuthFailureAudit``; ``app.state.refusal_audit`` may set other bounds), with an
  ``admin.request_refused_summary`` of what was only counted.

Every record carries ``client_ip`` and ``user_agent`` (``client_info``), method, path, status,
code, the message (truncated) and the gateway's ``x_request_id``. Authenticated refusals are
bounded by the edge's refusal budget: past it the edge answers 429 before the key is checked,
which lands in the bounded anonymous case.

The middleware must be the outermost one, to see the edge's own answers: ``install`` adds it
(once) to an app whose other middleware is in place (``server.build_server`` does).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.audit import AuditError
from appliance.client_info import client_fields
from appliance.gateway.auth_audit import AuthFailureAudit, short_path, write_bounded
from appliance.gateway.edge import claimed_key_id
from appliance.principal import AdminPrincipal, Principal

log = logging.getLogger(__name__)
RECORDED = "audit_recorded"  # request state: a record already says why this request was refused
_ACTIVE = "refusal_audit_active"
MAX_BODY = 8192  # bytes of an error answer read for its code and message
MAX_REASON = 300


def mark_recorded(scope_or_state: Any) -> None:
    """Say that a record of this request's refusal exists (an ASGI scope, or a request's state)."""
    if isinstance(scope_or_state, dict):
        scope_or_state.setdefault("state", {})[RECORDED] = True
    else:
        setattr(scope_or_state, RECORDED, True)


def _error_fields(body: bytes) -> tuple[str, str]:
    """``(code, message)`` of an OpenAI error envelope; ``("", "")`` when the body is not one."""
    try:
        doc = json.loads(body)
    except ValueError:
        return "", ""
    error = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(error, dict):
        return "", ""
    return str(error.get("code") or "")[:64], str(error.get("message") or "")


class RefusalAuditMiddleware:
    def __init__(self, app: ASGIApp, *, bounds: AuthFailureAudit | None = None) -> None:
        self.app = app
        self.bounds = bounds or AuthFailureAudit()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope.setdefault("state", {}) if scope["type"] == "http" else {}
        if scope["type"] != "http" or state.get(_ACTIVE):
            await self.app(scope, receive, send)
            return
        state[_ACTIVE] = True
        runtime = scope["app"].state.runtime
        bounds = getattr(scope["app"].state, "refusal_audit", None) or self.bounds
        summary = bounds.due()
        if summary is not None:
            await asyncio.to_thread(write_bounded, runtime.audit, "admin.request_refused",
                                    "admin.request_refused_summary", None, summary)
        status = 0
        body = bytearray()

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body" and 400 <= status < 500 and not state.get(RECORDED):
                if len(body) < MAX_BODY:
                    body.extend(message.get("body", b"")[: MAX_BODY - len(body)])
                if not message.get("more_body", False):
                    await self._record(scope, state, runtime, bounds, status, bytes(body))
            await send(message)

        await self.app(scope, receive, recording_send)

    async def _record(self, scope: Scope, state: dict[str, Any], runtime: Any, bounds: AuthFailureAudit,
                      status: int, body: bytes) -> None:
        mark_recorded(scope)
        code, message = _error_fields(body)
        who = client_fields(scope)
        data: dict[str, Any] = {
            "status": status, "code": code or f"http_{status}", "reason": message[:MAX_REASON],
            "method": str(scope.get("method", ""))[:16], "path": short_path(str(scope.get("path", ""))),
            "x_request_id": str(state.get("request_id", "")), **who}
        principal, admin = state.get("principal"), state.get("admin")
        try:
            if isinstance(principal, Principal):
                await runtime.audit.append_async("rejected", stream=principal.tenant, actor=f"key:{principal.key_id}",
                                                 tenant=principal.tenant, data=data)
            elif isinstance(admin, AdminPrincipal):
                await runtime.audit.append_async("admin.request_refused", stream="_admin", actor=admin.actor,
                                                 data={**data, "key_id": admin.key_id})
            else:
                write, summary = bounds.admit(who["client_ip"])
                event = {**data, "claimed_key_id": claimed_key_id(scope)} if write else None
                if event is not None or summary is not None:
                    await asyncio.to_thread(write_bounded, runtime.audit, "admin.request_refused",
                                            "admin.request_refused_summary", event, summary)
        except AuditError as exc:  # the answer stands; a failing audit log refuses the next request
            log.error("could not record a refused request (%s %s): %s", status, code, exc)


def install(app: FastAPI) -> None:
    """Add the middleware to ``app`` as its outermost, unless it is there already."""
    if not any(m.cls is RefusalAuditMiddleware for m in app.user_middleware):
        app.add_middleware(RefusalAuditMiddleware)
