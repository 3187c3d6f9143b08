"""Tenant self-service: ``GET /v1/usage`` and ``GET /v1/audit/export``.

``/v1/usage`` (a key with scope ``inference`` or ``audit:read``): the tenant's tokens and requests
today and this month (UTC), its limits from policy and what is left. ``/v1/audit/export`` (scope
``audit:read``): the tenant's own audit records for a period as the signed tar that
``appliance audit export`` writes (verify it offline with ``appliance audit verify-export``). The
stream is the key's tenant, never a parameter, so no key can reach another tenant's records. The
export itself is an audit event on the ``_admin`` stream (``admin.audit_exported``: who, stream,
period, record count, format, client address and user agent; ``export_audit.py``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from appliance.client_info import client_fields
from appliance.gateway.deps import PrincipalDep, RuntimeDep
from appliance.gateway.export_audit import export_recorded
from appliance.service import RequestRejected
from appliance.usage import UsageStore

router = APIRouter(prefix="/v1")
MAX_PARAM = 64


def _usage_store(runtime: RuntimeDep) -> UsageStore:
    store = getattr(runtime, "usage", None)
    if not isinstance(store, UsageStore):
        raise RequestRejected(503, "usage accounting is not available on this gateway", "server_error",
                              "usage_unavailable")
    return store


@router.get("/usage")
async def usage(runtime: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    policy = runtime.policies.tenant_policy(principal.tenant)
    day, month = await asyncio.to_thread(_usage_store(runtime).usage, principal.tenant, policy)
    return {"object": "usage", "tenant": principal.tenant, "day": day.to_dict(), "month": month.to_dict()}


def when(name: str, value: str | None) -> str | None:
    """A period bound given as a query parameter, in UTC; a 400 naming the parameter otherwise."""
    if value is None:
        return None
    try:
        at = dt.datetime.fromisoformat(value)
    except ValueError:
        at = None
    if at is None or at.tzinfo is None:
        shown = value if len(value) <= MAX_PARAM else value[:MAX_PARAM] + "…"
        raise RequestRejected(400, f"{name}: expected an ISO 8601 time with its zone such as "
                              f"'2026-12-01T00:00:00+00:00', found {shown!r}", "invalid_request_error",
                              "invalid_parameter", param=name)
    return at.astimezone(dt.UTC).isoformat()


@router.get("/audit/export", response_model=None)
async def audit_export(request: Request, runtime: RuntimeDep, principal: PrincipalDep, since: str | None = None,
                       until: str | None = None) -> FileResponse:
    lower, upper = when("since", since), when("until", until)
    made = await export_recorded(runtime, principal.tenant, lower, upper, actor=f"key:{principal.key_id}",
                                 tenant=principal.tenant, via="tenant api", client=client_fields(request.scope))
    return FileResponse(made.path, media_type="application/x-tar", filename=made.path.name,
                        background=BackgroundTask(made.cleanup))
