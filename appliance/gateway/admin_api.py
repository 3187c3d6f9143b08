"""Admin API: tenants, keys and admins, audit verification, metrics. Needs an admin key (scope
``admin``, checked by ``auth.AuthMiddleware``); every change is an audit event on the ``_admin``
stream with actor ``admin:<name>`` and the admin's key id (never a secret)."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response
from prometheus_client import generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask

from appliance.apikeys import parse_duration, parse_expiry
from appliance.audit.db_verify import DEFAULT_UNSIGNED_GRACE_S
from appliance.client_info import client_fields
from appliance.errors import TenancyError
from appliance.gateway.deps import AdminDep, RuntimeDep
from appliance.gateway.export_audit import export_recorded
from appliance.gateway.self_service import when
from appliance.principal import AdminPrincipal
from appliance.service import RequestRejected

router = APIRouter(prefix="/admin/v1")
_STRICT = ConfigDict(extra="forbid", strict=True)


class TenantCreate(BaseModel):
    model_config = _STRICT
    name: str = Field(min_length=1, max_length=63)
    models: list[str] = Field(default_factory=list, max_length=64)


class TenantUpdate(BaseModel):
    model_config = _STRICT
    models: list[str] | None = Field(default=None, max_length=64)
    disabled: bool | None = None


class KeyCreate(BaseModel):
    model_config = _STRICT
    label: str = Field(default="", max_length=128)
    scopes: list[str] = Field(default_factory=lambda: ["inference"], min_length=1, max_length=3)
    expires: str | None = Field(default=None, max_length=64, description="'90d', '12h' or an ISO 8601 time")


class KeyRotate(BaseModel):
    model_config = _STRICT
    grace: str | None = Field(default=None, max_length=16, description="how long the old key keeps working: '1h'")


class AdminCreate(BaseModel):
    model_config = _STRICT
    name: str = Field(min_length=1, max_length=63)


def _refused(exc: TenancyError) -> RequestRejected:
    text = str(exc)
    if text.startswith(("unknown", "no active key")):
        return RequestRejected(404, text, "invalid_request_error", "not_found")
    if "already exists" in text or "was deleted" in text:
        return RequestRejected(409, text, "invalid_request_error", "conflict")
    return RequestRejected(400, text, "invalid_request_error", "invalid_request")


def _audit(runtime: RuntimeDep, admin: AdminPrincipal, event: str, data: dict[str, Any],
           tenant: str | None = None) -> None:
    runtime.audit.append(f"admin.{event}", stream="_admin", actor=admin.actor, tenant=tenant,
                         data={**data, "by_key_id": admin.key_id})


@router.get("/tenants")
def list_tenants(runtime: RuntimeDep, _admin: AdminDep, include_deleted: bool = False) -> dict[str, Any]:
    return {"data": [t.to_dict() for t in runtime.tenants.list_tenants(include_deleted=include_deleted)]}


@router.post("/tenants", status_code=201)
def create_tenant(body: TenantCreate, runtime: RuntimeDep, admin: AdminDep) -> dict[str, Any]:
    try:
        tenant = runtime.tenants.create_tenant(body.name, body.models)
    except TenancyError as exc:
        raise _refused(exc) from exc
    _audit(runtime, admin, "tenant_created", {"tenant": tenant.name, "models": list(tenant.models)}, tenant.name)
    return tenant.to_dict()


@router.get("/tenants/{name}")
def get_tenant(name: str, runtime: RuntimeDep, _admin: AdminDep) -> dict[str, Any]:
    tenant = runtime.tenants.get_tenant(name, include_deleted=True)
    if tenant is None:
        raise RequestRejected(404, f"unknown tenant {name[:64]!r}", "invalid_request_error", "not_found")
    return {**tenant.to_dict(), "keys": [k.to_dict() for k in runtime.tenants.list_keys(tenant=name)]}


@router.patch("/tenants/{name}")
def update_tenant(name: str, body: TenantUpdate, runtime: RuntimeDep, admin: AdminDep) -> dict[str, Any]:
    try:
        tenant = runtime.tenants.update_tenant(name, models=body.models, disabled=body.disabled)
    except TenancyError as exc:
        raise _refused(exc) from exc
    _audit(runtime, admin, "tenant_updated", body.model_dump(exclude_none=True) | {"tenant": name}, name)
    return tenant.to_dict()


@router.post("/tenants/{name}/disable")
def disable_tenant(name: str, runtime: RuntimeDep, admin: AdminDep) -> dict[str, Any]:
    return update_tenant(name, TenantUpdate(disabled=True), runtime, admin)


@router.delete("/tenants/{name}")
def delete_tenant(name: str, runtime: RuntimeDep, admin: AdminDep) -> dict[str, Any]:
    try:
        revoked = runtime.tenants.delete_tenant(name)
    except TenancyError as exc:
        raise _refused(exc) from exc
    _audit(runtime, admin, "tenant_deleted", {"tenant": name, "revoked_key_ids": revoked}, name)
    return {"tenant": name, "deleted": True, "revoked_key_ids": revoked}


@router.post("/tenants/{name}/keys", status_code=201)
def create_key(name: str, body: KeyCreate, runtime: RuntimeDep, admin: AdminDep) -> dict[str, Any]:
    try:
        issued = runtime.tenants.issue_key(name, body.label, scopes=body.scopes, expires_at=parse_expiry(body.expires),
                                           created_by=admin.actor)
    except TenancyError as exc:
        raise _refused(exc) from exc
    _audit(runtime, admin, "key_issued", {"tenant": name, "key_id": issued.key_id, "label": body.label,
                                          "scopes": list(issued.scopes), "expires_at": issued.expires_at}, name)
    return {"tenant": name, "key_id": issued.key_id, "key": issued.secret, "scopes": list(issued.scopes),
            "expires_at": issued.expires_at}


@router.get("/keys")
def list_keys(runtime: RuntimeDep, _admin: AdminDep, tenant: str | None = None, admin: str | None = None,
              include_revoked: bool = False) -> dict[str, Any]:
    keys = runtime.tenants.list_keys(tenant=tenant, admin=admin, include_revoked=include_revoked)
    return {"data": [k.to_dict() for k in keys]}


@router.delete("/keys/{key_id}")
def revoke_key(key_id: str, runtime: RuntimeDep, admin: AdminDep) -> dict[str, Any]:
    try:
        info = runtime.tenants.revoke_key(key_id)
    except TenancyError as exc:
        raise _refused(exc) from exc
    _audit(runtime, admin, "key_revoked", {"key_id": key_id, "owner": info.owner, "owner_kind": info.owner_kind})
    return {"key_id": key_id, "revoked": True}


@router.post("/keys/{key_id}/rotate", status_code=201)
def rotate_key(key_id: str, body: KeyRotate, runtime: RuntimeDep, admin: AdminDep) -> dict[str, Any]:
    try:
        grace = parse_duration(body.grace) if body.grace else dt.timedelta(0)
        new, old = runtime.tenants.rotate_key(key_id, grace=grace, created_by=admin.actor)
    except TenancyError as exc:
        raise _refused(exc) from exc
    _audit(runtime, admin, "key_rotated", {"key_id": key_id, "new_key_id": new.key_id, "owner": new.owner,
                                           "owner_kind": new.owner_kind, "old_revoked_at": old.revoked_at})
    return {"key_id": new.key_id, "key": new.secret, "owner": new.owner, "owner_kind": new.owner_kind,
            "scopes": list(new.scopes), "expires_at": new.expires_at, "old_key_id": key_id,
            "old_revoked_at": old.revoked_at}


@router.get("/admins")
def list_admins(runtime: RuntimeDep, _admin: AdminDep) -> dict[str, Any]:
    return {"data": [a.__dict__ for a in runtime.tenants.admins.list_admins()]}


@router.post("/admins", status_code=201)
def create_admin(body: AdminCreate, runtime: RuntimeDep, admin: AdminDep) -> dict[str, Any]:
    try:
        issued = runtime.tenants.admins.create_admin(body.name, admin.actor)
    except TenancyError as exc:
        raise _refused(exc) from exc
    _audit(runtime, admin, "admin_created", {"admin": body.name, "key_id": issued.key_id})
    return {"admin": body.name, "key_id": issued.key_id, "key": issued.secret}


class AdminKeyCreate(BaseModel):
    model_config = _STRICT
    label: str = Field(default="", max_length=128)
    expires: str | None = Field(default=None, max_length=64, description="'90d', '12h' or an ISO 8601 time")


@router.post("/admins/{name}/keys", status_code=201)
def create_admin_key(name: str, body: AdminKeyCreate, runtime: RuntimeDep, admin: AdminDep) -> dict[str, Any]:
    try:
        issued = runtime.tenants.admins.issue_key(name, body.label, expires_at=parse_expiry(body.expires),
                                                  created_by=admin.actor)
    except TenancyError as exc:
        raise _refused(exc) from exc
    _audit(runtime, admin, "key_issued", {"owner": name, "owner_kind": "admin", "key_id": issued.key_id,
                                          "label": body.label, "expires_at": issued.expires_at})
    return {"admin": name, "key_id": issued.key_id, "key": issued.secret, "scopes": ["admin"],
            "expires_at": issued.expires_at}


@router.post("/admins/{name}/disable")
def disable_admin(name: str, runtime: RuntimeDep, admin: AdminDep) -> dict[str, Any]:
    if name == admin.name:
        raise RequestRejected(400, "an admin cannot disable itself: expected another admin's name",
                              "invalid_request_error", "invalid_request")
    try:
        found = runtime.tenants.admins.set_disabled(name, True)
    except TenancyError as exc:
        raise _refused(exc) from exc
    _audit(runtime, admin, "admin_disabled", {"admin": name})
    return found.__dict__


@router.get("/audit/verify")
async def verify_audit(request: Request, runtime: RuntimeDep, admin: AdminDep) -> dict[str, Any]:
    """Verify the whole log; the verification and its verdict are recorded (``admin.audit_verified``)."""
    report = await asyncio.to_thread(runtime.audit.verify, unsigned_grace_s=DEFAULT_UNSIGNED_GRACE_S)
    await asyncio.to_thread(_audit, runtime, admin, "audit_verified", {
        "ok": report.ok, "streams_checked": report.streams_checked, "records_checked": report.records_checked,
        "failed_streams": [s.stream for s in report.streams if not s.ok][:50], "via": "admin api",
        **client_fields(request.scope)})
    return report.to_dict()


@router.get("/audit/export", response_model=None)
async def export_audit(request: Request, runtime: RuntimeDep, admin: AdminDep, stream: str,
                       since: str | None = None, until: str | None = None) -> FileResponse:
    """One stream's records for a period (any tenant's, or ``_admin``), as the signed tar that
    ``appliance audit export`` writes; recorded as ``admin.audit_exported`` under the admin's name."""
    lower, upper = when("since", since), when("until", until)
    made = await export_recorded(runtime, stream, lower, upper, actor=admin.actor,
                                 tenant=None if stream == "_admin" else stream, via="admin api",
                                 client={**client_fields(request.scope), "by_key_id": admin.key_id})
    return FileResponse(made.path, media_type="application/x-tar", filename=made.path.name,
                        background=BackgroundTask(made.cleanup))


@router.get("/metrics")
def metrics(runtime: RuntimeDep, _admin: AdminDep) -> Response:
    body = generate_latest(runtime.service.metrics.registry)
    return Response(body, media_type="text/plain; version=0.0.4")
