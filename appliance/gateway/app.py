"""FastAPI application factory for the gateway."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from appliance.gateway import admin_api, auth, nodes_api, policy_api, refusal_audit, tenant_api
from appliance.gateway.edge import EdgeLimits, EdgeMiddleware
from appliance.gateway.errors import install_error_handlers
from appliance.gateway.openapi import install_openapi
from appliance.gateway.refusals import RefusalBudget
from appliance.runtime import Runtime


def create_app(runtime: Runtime, *, manage_lifecycle: bool = True, limits: EdgeLimits | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if manage_lifecycle:
            await runtime.start()
        try:
            yield
        finally:
            if manage_lifecycle:
                await runtime.stop()

    limits = limits or EdgeLimits()
    # No HTML docs (they would load scripts from a CDN) and no open /openapi.json: install_openapi
    # serves the tenant and admin documents, each behind its key.
    app = FastAPI(title="Sovereign Appliance Gateway", version=runtime.config.version, lifespan=lifespan,
                  openapi_url=None, docs_url=None, redoc_url=None)
    app.state.runtime = runtime
    app.state.edge_limits = limits
    app.state.refusals = RefusalBudget(limits.refusals_per_minute)
    install_error_handlers(app)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "version": runtime.config.version, "model": runtime.config.model_name,
                "node": runtime.config.node.name}

    app.include_router(tenant_api.router)
    app.include_router(admin_api.router)
    app.include_router(nodes_api.router)
    app.include_router(policy_api.router)
    auth.install(app)  # key checked before the body is read (innermost middleware); /v1/usage, /v1/audit/export
    install_openapi(app)
    # Added last, so it is the outermost of the app's middleware: it sees every request and response.
    app.add_middleware(EdgeMiddleware, limits=limits, refusals=app.state.refusals)
    refusal_audit.install(app)  # outermost: records the 4xx answers nobody else recorded, the edge's too
    return app
