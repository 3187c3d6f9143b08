"""Request dependencies: the runtime, and who is calling.

The key is checked by ``auth.AuthMiddleware`` before the body is read; these dependencies read
what it put in the request's state. A route reached without it (the middleware missing) fails
closed with 401.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from appliance.principal import AdminPrincipal, Principal
from appliance.runtime import Runtime
from appliance.service import RequestRejected


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def get_principal(request: Request) -> Principal:
    principal = getattr(request.state, "principal", None)
    if not isinstance(principal, Principal):
        raise RequestRejected(401, "missing API key: expected the header 'Authorization: Bearer <tenant key>'",
                              "invalid_request_error", "missing_api_key")
    return principal


def require_admin(request: Request) -> AdminPrincipal:
    admin = getattr(request.state, "admin", None)
    if not isinstance(admin, AdminPrincipal):
        raise RequestRejected(401, "admin key required: expected the header 'Authorization: Bearer <admin key>'",
                              "invalid_request_error", "missing_api_key")
    return admin


PrincipalDep = Annotated[Principal, Depends(get_principal)]
AdminDep = Annotated[AdminPrincipal, Depends(require_admin)]
