"""Every error the gateway answers is the OpenAI envelope ``{"error": {message, type, param, code}}``.

Handlers for what FastAPI and Starlette raise themselves (unknown route, wrong method, a body that
is not JSON or not UTF-8 or nested too deep, a request that fails validation) and for the
service's ``RequestRejected``. Uncaught exceptions are answered by the edge middleware
(``edge.py``), which knows the request id. Client strings echoed in messages are truncated.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from appliance.openai_schema import error_body
from appliance.service import RequestRejected

ECHO_CHARS = 64
_UNION_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}

log = logging.getLogger(__name__)


def truncate_echo(value: object, limit: int = ECHO_CHARS) -> str:
    """A client-supplied value as it may appear in an error or audit record: repr'd, at most
    ``limit`` characters of it, then "…" (so a 1 MB model name costs 64 characters, not 1 MB)."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


class EdgeRefusal(HTTPException):
    """An error the edge raises while the request is read (413, 408, 400): an HTTPException so
    FastAPI's body parsing passes it through unchanged instead of turning it into a generic 400."""

    def __init__(self, status: int, message: str, code: str, *, close: bool = False,
                 headers: dict[str, str] | None = None) -> None:
        all_headers = {**(headers or {}), **({"Connection": "close"} if close else {})}
        super().__init__(status, message, headers=all_headers or None)
        self.message = message
        self.code = code


def _loc(loc: tuple[Any, ...]) -> str:
    # Drop "body" and the union-member tags pydantic adds ("str", "list[TextPart]").
    parts = [str(p) for p in loc if p != "body" and not (isinstance(p, str) and (
        p.lower() in _UNION_TAGS or "[" in p))]
    return ".".join(parts)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        return "request body is not valid JSON: expected one JSON object", None
    # Our own checks (limits, surrogates) say more than a union's "not a valid string".
    own = [e for e in errors if e.get("type") == "value_error"]
    errors = own or errors
    parts: list[str] = []
    param: str | None = None
    for err in errors[:5]:
        loc = _loc(tuple(err.get("loc", ())))
        param = param or loc or None
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        found = ""
        if err.get("type") == "extra_forbidden":  # a typo must not fall back to a default silently
            parts.append(f"{loc}: unknown field; expected only the fields listed in docs/tenant-api.md")
            continue
        if err.get("type") != "value_error" and "input" in err and not isinstance(err["input"], dict | list):
            found = f" (found {truncate_echo(repr(err['input']))})"
        parts.append(f"{loc or 'body'}: {msg}{found}")
    more = f"; and {len(errors) - 5} more" if len(errors) > 5 else ""
    return "invalid request: " + "; ".join(parts) + more, param


def _status_error(exc: HTTPException, request: Request) -> tuple[str, str, str]:
    if isinstance(exc, EdgeRefusal):
        return exc.message, "invalid_request_error", exc.code
    method, path = request.method, truncate_echo(request.url.path)
    if exc.status_code == 404:
        return f"no such route: {method} {path}", "invalid_request_error", "not_found"
    if exc.status_code == 405:
        return f"method {method} is not allowed on {path}", "invalid_request_error", "method_not_allowed"
    if exc.status_code == 400:
        # FastAPI's "There was an error parsing the body": not UTF-8, nested too deep, ...
        return ("request body could not be parsed: expected one UTF-8 JSON object nested at most "
                "a few hundred levels deep", "invalid_request_error", "invalid_body")
    return truncate_echo(str(exc.detail), 200), "invalid_request_error", f"http_{exc.status_code}"


async def _audit_invalid(req: Request, message: str, param: str | None) -> None:
    """A malformed request from an authenticated tenant is a security event: recorded as
    ``rejected`` (400 ``invalid_request``) in the tenant's stream, the message truncated. Floods are
    bounded before this point by the refusal budget (every 4xx is charged; past the budget the edge
    answers 429 without reading the body, so nothing is written)."""
    principal = getattr(req.state, "principal", None)
    runtime = getattr(req.app.state, "runtime", None)
    if principal is None or runtime is None:
        return
    # local imports: gateway.refusal_audit imports this module's neighbours (circular at top level)
    from appliance.client_info import client_fields
    from appliance.gateway.refusal_audit import mark_recorded

    data = {"status": 400, "code": "invalid_request", "reason": truncate_echo(message, 300), "param": param,
            "path": req.url.path, "x_request_id": getattr(req.state, "request_id", ""), **client_fields(req.scope)}
    try:
        await runtime.audit.append_async("rejected", stream=principal.tenant, actor=f"key:{principal.key_id}",
                                         tenant=principal.tenant, data=data)
    except Exception:  # the answer is a 400 either way; a failing audit log refuses the next request
        log.warning("could not record a malformed request of tenant %s", principal.tenant)
    mark_recorded(req.state)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestRejected)
    async def _rejected(_req: Request, exc: RequestRejected) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
        if exc.status == 401:
            headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
        return JSONResponse(error_body(exc.message, exc.type, exc.code, exc.param), exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(req: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        await _audit_invalid(req, message, param)
        return JSONResponse(error_body(message, "invalid_request_error", "invalid_request", param), 400)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        message, type_, code = _status_error(exc, request)
        return JSONResponse(error_body(message, type_, code), exc.status_code, headers=exc.headers)
