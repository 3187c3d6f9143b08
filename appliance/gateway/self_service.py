"""Tenant self-service: ``GET /v1/usage`` and ``GET /v1/audit/export``.

``/v1/usage`` (a key with scope ``inference`` or ``audit:read``): the tenant's tokens and requests
today and this month (UTC), its limits from policy and what is left. ``/v1/audit/export`` (scope
``audit:read``): the tenant's own audit records for a period as the signed tar that
``appliance audit export`` writes (verify it offline with ``appliance audit verify-export``). The
stream is the key's tenant, never a parameter, so no key can reach another tenant's records. The
export itself is an audit event on the ``_admin`` stream.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from appliance.audit import AuditError, AuditIntegrityError, export_stream
from appliance.gateway.deps import PrincipalDep, RuntimeDep
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


def _when(name: str, value: str | None) -> str | None:
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
async def audit_export(runtime: RuntimeDep, principal: PrincipalDep, since: str | None = None,
                       until: str | None = None) -> FileResponse:
    lower, upper = _when("since", since), _when("until", until)
    workdir = Path(tempfile.mkdtemp(prefix="tenant-export-", dir=runtime.config.data_dir))
    out = workdir / f"audit-{principal.tenant}.tar"

    def cleanup() -> None:
        out.unlink(missing_ok=True)
        workdir.rmdir()

    try:
        await asyncio.to_thread(export_stream, runtime.audit, principal.tenant, lower, upper, out)
        await asyncio.to_thread(
            runtime.audit.append, "admin.audit_exported", stream="_admin", actor=f"key:{principal.key_id}",
            tenant=principal.tenant, data={"stream": principal.tenant, "since": lower, "until": upper,
                                           "via": "tenant api"})
    except AuditIntegrityError as exc:
        cleanup()
        raise RequestRejected(500, "the audit log does not verify; an admin must look at it before anything is "
                              "exported", "server_error", "audit_integrity") from exc
    except AuditError as exc:
        cleanup()
        raise RequestRejected(400, f"audit export refused: {str(exc)[:200]}", "invalid_request_error",
                              "invalid_request") from exc
    except BaseException:
        cleanup()
        raise
    return FileResponse(out, media_type="application/x-tar", filename=out.name, background=BackgroundTask(cleanup))
