"""Admin API: tenants and keys, audit verification, metrics. Every change is an audit event."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import generate_latest
from pydantic import BaseModel, Field

from appliance.errors import TenancyError
from appliance.gateway.deps import AdminDep, RuntimeDep
from appliance.service import RequestRejected

router = APIRouter(prefix="/admin/v1")


class TenantCreate(BaseModel):
    name: str = Field(min_length=1, max_length=63)


class KeyCreate(BaseModel):
    label: str = Field(default="", max_length=128)


def _audit_admin(runtime: RuntimeDep, event: str, data: dict[str, Any]) -> None:
    runtime.audit.append(f"admin.{event}", stream="_admin", actor="admin-api", data=data)


@router.get("/tenants")
def list_tenants(runtime: RuntimeDep, _admin: AdminDep) -> dict[str, Any]:
    return {"data": [t.__dict__ for t in runtime.tenants.list_tenants()]}


@router.post("/tenants", status_code=201)
def create_tenant(body: TenantCreate, runtime: RuntimeDep, _admin: AdminDep) -> dict[str, Any]:
    try:
        tenant = runtime.tenants.create_tenant(body.name)
    except TenancyError as exc:
        raise RequestRejected(409 if "exists" in str(exc) else 400, str(exc), "invalid_request_error",
                              "tenant_invalid") from exc
    _audit_admin(runtime, "tenant_created", {"tenant": tenant.name})
    return tenant.__dict__


@router.post("/tenants/{name}/keys", status_code=201)
def create_key(name: str, body: KeyCreate, runtime: RuntimeDep, _admin: AdminDep) -> dict[str, Any]:
    try:
        issued = runtime.tenants.issue_key(name, body.label)
    except TenancyError as exc:
        raise RequestRejected(404, str(exc), "invalid_request_error", "tenant_not_found") from exc
    _audit_admin(runtime, "key_issued", {"tenant": name, "key_id": issued.key_id, "label": body.label})
    return {"tenant": name, "key_id": issued.key_id, "key": issued.secret}


@router.delete("/keys/{key_id}")
def revoke_key(key_id: str, runtime: RuntimeDep, _admin: AdminDep) -> dict[str, Any]:
    try:
        runtime.tenants.revoke_key(key_id)
    except TenancyError as exc:
        raise RequestRejected(404, str(exc), "invalid_request_error", "key_not_found") from exc
    _audit_admin(runtime, "key_revoked", {"key_id": key_id})
    return {"key_id": key_id, "revoked": True}


@router.get("/audit/verify")
async def verify_audit(runtime: RuntimeDep, _admin: AdminDep) -> dict[str, Any]:
    report = await asyncio.to_thread(runtime.audit.verify)
    return {"ok": report.ok, "report": repr(report)}


@router.get("/metrics")
def metrics(runtime: RuntimeDep, _admin: AdminDep) -> Response:
    body = generate_latest(runtime.service.metrics.registry)
    return Response(body, media_type="text/plain; version=0.0.4")
