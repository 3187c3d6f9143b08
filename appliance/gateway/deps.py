"""Request dependencies: the runtime, and who is calling.

The key is checked by ``auth.AuthMiddleware`` before the body is read; these dependencies read
what it put in the request's state, on the event loop (a plain-function dependency would cost
every request a hop to a worker thread and back). On an app without the middleware they check the
key themselves with the same rules, in a worker thread (a database read), so a route never runs
for a caller the middleware would have refused.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from appliance.apikeys import KeyCheck
from appliance.gateway.auth import AUTH_CHECKED, accepted, bearer, refusal, required_scopes
from appliance.principal import AdminPrincipal, Principal
from appliance.runtime import Runtime
from appliance.service import RequestRejected


async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def _check_here(request: Request) -> None:
    """The middleware's check, for an app it is not installed on (no auditing, no cache)."""
    needed = required_scopes(request.url.path)
    if needed is None or getattr(request.state, AUTH_CHECKED, False):  # the middleware's verdict stands
        return
    token = bearer(request.scope)
    runtime: Runtime = request.app.state.runtime
    check = KeyCheck("missing_api_key") if token is None else runtime.tenants.check(token)
    refused = refusal(check, needed)
    if refused is not None:
        status, type_, code, message = refused
        raise RequestRejected(status, message, type_, code)
    for name, value in accepted(check).items():
        setattr(request.state, name, value)


async def _checked(request: Request) -> None:
    if not getattr(request.state, AUTH_CHECKED, False):
        await run_in_threadpool(_check_here, request)


async def get_principal(request: Request) -> Principal:
    await _checked(request)
    principal = getattr(request.state, "principal", None)
    if not isinstance(principal, Principal):
        raise RequestRejected(403, "this route needs a tenant key", "permission_denied", "insufficient_scope")
    return principal


async def require_admin(request: Request) -> AdminPrincipal:
    await _checked(request)
    admin = getattr(request.state, "admin", None)
    if not isinstance(admin, AdminPrincipal):
        raise RequestRejected(403, "this route needs a key with scope 'admin'", "permission_denied",
                              "insufficient_scope")
    return admin


PrincipalDep = Annotated[Principal, Depends(get_principal)]
AdminDep = Annotated[AdminPrincipal, Depends(require_admin)]
