"""FastAPI application factory for the gateway."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from appliance.gateway import admin_api, tenant_api
from appliance.openai_schema import error_body
from appliance.runtime import Runtime
from appliance.service import RequestRejected


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts = []
    param = None
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        param = param or loc or None
        parts.append(f"{loc or 'body'}: {err.get('msg')}" + (f" (got {err['input']!r})" if "input" in err
                                                            and not isinstance(err["input"], dict) else ""))
    return "invalid request: " + "; ".join(parts), param


def create_app(runtime: Runtime, *, manage_lifecycle: bool = True) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if manage_lifecycle:
            await runtime.start()
        try:
            yield
        finally:
            if manage_lifecycle:
                await runtime.stop()

    app = FastAPI(title="Sovereign Appliance Gateway", version=runtime.config.version, lifespan=lifespan)
    app.state.runtime = runtime

    @app.exception_handler(RequestRejected)
    async def _rejected(_req: Request, exc: RequestRejected) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
        if exc.status == 401:
            headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
        return JSONResponse(error_body(exc.message, exc.type, exc.code, exc.param), exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, "invalid_request_error", "invalid_request", param), 400)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "version": runtime.config.version, "model": runtime.config.model_name,
                "node": runtime.config.node.name}

    app.include_router(tenant_api.router)
    app.include_router(admin_api.router)
    return app
