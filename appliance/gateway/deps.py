"""Request dependencies: the runtime, and who is calling (tenant key or admin token)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from appliance.runtime import Runtime
from appliance.principal import Principal
from appliance.service import RequestRejected


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def get_principal(runtime: RuntimeDep, authorization: Annotated[str | None, Header()] = None) -> Principal:
    token = _bearer(authorization)
    if token is None:
        raise RequestRejected(
            401, "missing API key: send 'Authorization: Bearer <tenant key>'", "invalid_request_error",
            "missing_api_key",
        )
    found = runtime.tenants.authenticate(token)
    if found is None:
        raise RequestRejected(401, "invalid API key", "invalid_request_error", "invalid_api_key")
    return Principal(tenant=found[0], key_id=found[1])


def require_admin(runtime: RuntimeDep, authorization: Annotated[str | None, Header()] = None) -> str:
    token = _bearer(authorization)
    if token is None or not runtime.check_admin(token):
        raise RequestRejected(401, "admin token required", "invalid_request_error", "invalid_admin_token")
    return "admin"


PrincipalDep = Annotated[Principal, Depends(get_principal)]
AdminDep = Annotated[str, Depends(require_admin)]
