"""The gateway's OpenAPI documents: one for tenants, one for admins, each behind its own key.

FastAPI's generated document lists every route (admin ones too), promises a 422 the gateway never
sends and says nothing of the errors it does send. These documents are built from the same routes
and then made exact: tenant routes only (or admin routes only), no 422, and for every operation the
OpenAI error envelope on each status the gateway answers, the ``x-request-id`` header on every
response, ``text/event-stream`` beside JSON where a request may stream, and bearer auth.

There are no HTML docs pages (``/docs``, ``/redoc``): FastAPI's load Swagger UI from a public CDN,
which an air-gapped appliance must not do, and the JSON document is all a client generator needs.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse

from appliance.gateway.deps import AdminDep
from appliance.principal import Principal
from appliance.service import RequestRejected

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {
            "message": {"type": "string"},
            "type": {"type": "string"},
            "param": {"type": ["string", "null"]},
            "code": {"type": ["string", "null"]},
        },
    }},
}
ERROR_DESCRIPTIONS = {
    400: "Invalid request: the message names the field or limit, what was expected and what was found",
    401: "Missing or invalid key",
    403: "The key may not do this (policy, residency, scope)",
    404: "No such model, route or resource",
    408: "The request body did not arrive in time",
    409: "The resource already exists",
    413: "The request body is larger than the limit, which the message names",
    429: "Rate limit, refusal budget or admission: see Retry-After",
    500: "Internal error; the message names the request id",
    503: "Busy, or no compliant node or audit log available: see Retry-After",
}
# Routes that answer 2xx with something other than JSON (FastAPI documents JSON unless a route
# names its response_class).
NOT_JSON = {"/admin/v1/metrics": "text/plain", "/v1/audit/export": "application/x-tar",
            "/admin/v1/audit/export": "application/x-tar"}
# One server-sent event (OpenAPI 3.1 has a text/event-stream schema describe each event): its data
# is a JSON chunk, an error object, or the final "[DONE]".
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
EXAMPLES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4},
    "/v1/completions": {"prompt": "Hello", "max_tokens": 4},
}
_ALWAYS = (401, 429, 500, 503)  # any operation (also those that take no body)
_WITH_BODY = (400, 408, 413)
REQUEST_ID = {"x-request-id": {"description": "The gateway's id of this request", "schema": {"type": "string"}}}


def _is_tenant(path: str) -> bool:
    return path.startswith("/v1/") or path == "/health"


def _is_admin(path: str) -> bool:
    return path.startswith("/admin/")


def build_document(app: FastAPI, keep: Callable[[str], bool], title: str, statuses: Sequence[int],
                   model: str | None = None) -> dict[str, Any]:
    """The document of the routes whose paths ``keep`` accepts; ``model`` (the served model's
    name) makes the request examples ones the gateway serves."""
    full = copy.deepcopy(get_openapi(title=title, version=app.version, routes=app.routes))
    doc = {**full, "paths": {p: ops for p, ops in full.get("paths", {}).items() if keep(p)}}
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            _exact_responses(path, method, op, statuses)
            if model and path in EXAMPLES and "requestBody" in op:
                media = op["requestBody"].get("content", {}).get("application/json")
                if media is not None:
                    media["example"] = {"model": model, **EXAMPLES[path]}
    doc["components"] = {
        "schemas": {**_referenced(doc["paths"], full.get("components", {}).get("schemas", {})),
                    "ErrorResponse": ERROR_SCHEMA},
        "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
    }
    return doc


def _referenced(paths: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    """The component schemas the kept paths use (transitively); the others' (admin models, the
    422's validation error) are left out."""
    prefix = "#/components/schemas/"
    kept: dict[str, Any] = {}
    todo = [paths]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith(prefix):
                name = ref[len(prefix):]
                if name not in kept and name in schemas:
                    kept[name] = schemas[name]
                    todo.append(schemas[name])
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)
    return kept


def _exact_responses(path: str, method: str, op: dict[str, Any], statuses: Sequence[int]) -> None:
    responses: dict[str, Any] = op.setdefault("responses", {})
    responses.pop("422", None)
    wanted = {*_ALWAYS, *statuses}
    if op.get("parameters"):
        wanted.add(400)
    if "requestBody" in op:
        wanted.update(_WITH_BODY)
    if path == "/health":
        wanted -= {401, 403, 404, 409}
    else:
        op["security"] = [{"bearerAuth": []}]
    for status in sorted(wanted):
        responses[str(status)] = {
            "description": ERROR_DESCRIPTIONS[status], "headers": REQUEST_ID,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
        }
    for code, response in responses.items():
        response.setdefault("headers", REQUEST_ID)
        if code.startswith("2") and path in NOT_JSON:
            response["content"] = {NOT_JSON[path]: {"schema": {"type": "string"}}}
        if code.startswith("2") and method == "post" and path.startswith("/v1/"):
            # Any request with "stream": true is answered as server-sent events.
            response.setdefault("content", {})["text/event-stream"] = {"schema": SSE_EVENT}


async def _tenant_key(request: Request) -> None:
    """A valid tenant key: the one the auth middleware accepted, else checked here (the middleware
    may not cover this path); 401 otherwise."""
    if isinstance(getattr(request.state, "principal", None), Principal):
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    runtime = request.app.state.runtime
    if scheme.lower() == "bearer" and token.strip():
        if await asyncio.to_thread(runtime.tenants.authenticate, token.strip()) is not None:
            return
    raise RequestRejected(401, "a tenant key is required for the API document: expected the header "
                          "'Authorization: Bearer <key>'", "invalid_request_error", "invalid_api_key")


def install_openapi(app: FastAPI) -> None:
    """``GET /openapi.json`` (tenant key) and ``GET /admin/openapi.json`` (admin key)."""
    cache: dict[str, dict[str, Any]] = {}
    router = APIRouter(include_in_schema=False)

    def document(kind: str) -> dict[str, Any]:
        if kind not in cache:
            if kind == "tenant":
                model = getattr(app.state.runtime.config, "model_name", None)
                cache[kind] = build_document(app, _is_tenant, f"{app.title}: tenant API", (403, 404), model)
            else:
                cache[kind] = build_document(app, _is_admin, f"{app.title}: admin API", (403, 404, 409))
        return cache[kind]

    @router.get("/openapi.json")
    async def tenant_openapi(request: Request) -> JSONResponse:
        await _tenant_key(request)
        return JSONResponse(document("tenant"))

    @router.get("/admin/openapi.json")
    def admin_openapi(_request: Request, _admin: AdminDep) -> JSONResponse:
        return JSONResponse(document("admin"))

    app.include_router(router)
