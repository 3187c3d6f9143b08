"""Authentication before anything else: a pure ASGI middleware that checks the bearer key of every
``/v1/*`` (tenant) and ``/admin/*`` (admin) request before a byte of its body is read.

- The key is looked up in a worker thread (never on the event loop); valid keys are cached for a
  few seconds (``TenantStore.cache``), so a busy key costs no database round trip per request.
  A served gateway (``server.build_server``) attaches the database's key events to that cache
  (``appliance/key_events.py``): a revocation, suspension or expiry change made by any process on
  the same database ends the key's use here at once, not after the cache's few seconds.
- Refusals are answered here, in the OpenAI envelope, without reading the body: 401
  ``missing_api_key`` / ``invalid_api_key`` / ``expired_api_key`` (with ``WWW-Authenticate:
  Bearer``), 403 ``tenant_disabled`` / ``admin_disabled`` / ``insufficient_scope`` (naming the scope
  the route needs). Each is audited with the client's address and user agent, bounded per client
  address (``auth_audit``), and the request is marked recorded (``refusal_audit.mark_recorded``).
- An accepted key is put in the request's state: ``principal`` (tenant, a ``Principal``) or
  ``admin`` (an ``AdminPrincipal``), and ``key_id``; ``deps.py`` reads them from there.
- ``last_used_at`` is written at most once a minute per key, in a worker thread.
- An install that starts the appliance writes its first-admin key after the gateway opened: while
  no admin has been seen and ROOT/secrets/admin.key exists, a refused admin key triggers the
  first-admin bootstrap (``admins.bootstrap_admins``) once more before the refusal stands.

The failure-audit bounds are an ``AuthFailureAudit`` (defaults: 10 records per client address and
200 in all per minute); an app may set its own as ``app.state.auth_failures``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from fastapi import FastAPI
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from appliance.admins import ADMIN_KEY_FILE, bootstrap_admins
from appliance.apikeys import KeyCache, KeyCheck, LastUsed, split_key
from appliance.client_info import client_fields
from appliance.gateway.auth_audit import AuthFailureAudit, failure_event
from appliance.gateway.refusal_audit import mark_recorded
from appliance.openai_schema import error_body
from appliance.principal import AdminPrincipal, Principal

log = logging.getLogger(__name__)

ADMIN, INFERENCE, AUDIT_READ = "admin", "inference", "audit:read"
AUTH_CHECKED = "auth_checked"  # request state: the middleware checked this request's key


def required_scopes(path: str) -> tuple[str, ...] | None:
    """Scopes of which a key needs one for ``path``; None for routes without a key (``/health``)."""
    if path == "/admin" or path.startswith("/admin/"):
        return (ADMIN,)
    if path == "/v1/audit" or path.startswith("/v1/audit/"):
        return (AUDIT_READ,)
    if path == "/v1/usage":
        return (INFERENCE, AUDIT_READ)
    if path == "/v1" or path.startswith("/v1/"):
        return (INFERENCE,)
    return None


def bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


def _has_body(scope: Scope) -> bool:
    for name, value in scope.get("headers", ()):
        if (name == b"content-length" and value.strip() not in (b"", b"0")) or name == b"transfer-encoding":
            return True
    return False


REFUSALS = {
    "missing_api_key": (401, "invalid_request_error",
                        "missing API key: expected the header 'Authorization: Bearer <key>'"),
    "invalid_api_key": (401, "invalid_request_error", "invalid API key"),
    "expired_api_key": (401, "invalid_request_error", "API key expired"),
    "tenant_disabled": (403, "permission_denied", "the tenant of this key is disabled"),
    "admin_disabled": (403, "permission_denied", "the admin of this key is disabled"),
}


def refusal(check: KeyCheck, needed: tuple[str, ...]) -> tuple[int, str, str, str] | None:
    """``(status, type, code, message)`` when ``check`` does not open a route needing one of
    ``needed``; None when it does."""
    if not check.ok:
        status, type_, message = REFUSALS[check.code]
        return status, type_, check.code, message
    if not any(s in check.scopes for s in needed):
        wanted = " or ".join(repr(s) for s in needed)
        has = ", ".join(repr(s) for s in check.scopes) or "none"
        kind = "admin" if check.admin is not None else "tenant"
        return (403, "permission_denied", "insufficient_scope",
                f"this route needs a key with scope {wanted}; this {kind} key has {has}")
    return None


def accepted(check: KeyCheck) -> dict[str, Any]:
    """What an accepted key puts in the request state."""
    if check.admin is not None:
        return {"admin": AdminPrincipal(name=check.admin, key_id=str(check.key_id))}
    return {"principal": Principal(tenant=str(check.tenant), key_id=str(check.key_id), scopes=check.scopes,
                                   models=check.models)}


class AuthMiddleware:
    def __init__(self, app: ASGIApp, *, failure_audit: AuthFailureAudit | None = None) -> None:
        self.app = app
        self.failures = failure_audit or AuthFailureAudit()
        self.last_used = LastUsed()
        self._background: set[asyncio.Task[None]] = set()
        self._admins_seen = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        runtime = scope["app"].state.runtime
        failures = getattr(scope["app"].state, "auth_failures", None) or self.failures
        summary = failures.due()
        if summary is not None:
            self._spawn(AuthFailureAudit.write, runtime.audit, None, summary)
        needed = required_scopes(scope.get("path", ""))
        if needed is None:
            await self.app(scope, receive, send)
            return
        token = bearer(scope)
        store = runtime.tenants
        if token is None:
            check = KeyCheck("missing_api_key")
        else:
            cache: KeyCache = store.cache
            fingerprint = cache.fingerprint(token)
            epoch = cache.epoch()  # before the lookup: a change committed after it outdates what we keep
            cached = cache.get(fingerprint, epoch)
            if cached is None:
                check = await asyncio.to_thread(store.check, token)
                if check.code == "invalid_api_key" and needed == (ADMIN,) and self._first_admin_waiting(runtime):
                    check = await asyncio.to_thread(self._enrol_first_admin, runtime, token)
                cache.put(fingerprint, check, epoch)
            else:
                check = cached
        state = scope.setdefault("state", {})
        if check.key_id is None and token is not None:
            check = KeyCheck(check.code, split_key(token)[0])
        state["key_id"] = check.key_id
        state[AUTH_CHECKED] = True
        refused = refusal(check, needed)
        if refused is not None:
            await self._refuse(scope, send, runtime, failures, check, *refused)
            return
        state.update(accepted(check))
        if self.last_used.due(str(check.key_id)):
            self._spawn(store.touch, str(check.key_id))
        await self.app(scope, receive, send)

    def _first_admin_waiting(self, runtime: Any) -> bool:
        """The installer wrote its first-admin key after this gateway started (an install that
        starts the appliance): cheap to ask, and asked only while no admin has been seen."""
        if self._admins_seen:
            return False
        return bool((runtime.config.secrets_dir / ADMIN_KEY_FILE).exists())

    def _enrol_first_admin(self, runtime: Any, token: str) -> KeyCheck:
        store = runtime.tenants
        done = bootstrap_admins(store.admins, runtime.audit, runtime.config.secrets_dir)
        self._admins_seen = store.admins.count() > 0
        log.info("admins: %s", done)
        return store.check(token)  # type: ignore[no-any-return]

    async def _refuse(self, scope: Scope, send: Send, runtime: Any, failures: AuthFailureAudit, check: KeyCheck,
                      status: int, type_: str, code: str, message: str) -> None:
        who = client_fields(scope)
        client = who["client_ip"]
        write, summary = failures.admit(client)
        event = failure_event(code, check.key_id, client, scope.get("method", ""), scope.get("path", ""),
                              tenant=check.tenant, admin=check.admin, user_agent=who["user_agent"]) if write else None
        mark_recorded(scope)  # written, or counted in the window's summary
        if event is not None or summary is not None:
            await asyncio.to_thread(AuthFailureAudit.write, runtime.audit, event, summary)
        body = json.dumps(error_body(message, type_, code, None)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        if _has_body(scope):  # never read: the connection ends with this answer
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _spawn(self, fn: Any, *args: Any) -> None:
        """Run ``fn(*args)`` in a worker thread without making the request wait for it."""
        async def run() -> None:
            try:
                await asyncio.to_thread(fn, *args)
            except Exception:  # a background write must never take the gateway down
                log.exception("background %s failed", getattr(fn, "__name__", fn))

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def install(app: FastAPI) -> None:
    """Register the middleware and the tenant self-service routes on the gateway app."""
    from appliance.gateway import self_service

    # Innermost: inside the edge's middleware (request ids, refusal budget, body caps), which then
    # sees the key id this one sets; still before any route reads the body.
    app.user_middleware.append(Middleware(AuthMiddleware))
    app.include_router(self_service.router)
