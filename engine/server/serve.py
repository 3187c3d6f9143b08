"""Run the node server under uvicorn with mutual TLS: every client must present a certificate
signed by the configured client CA. There is no plain-HTTP or one-way-TLS mode."""

from __future__ import annotations

import ssl
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.node_http import KEEP_ALIVE_S
from engine.server.app import build_app


@dataclass(frozen=True)
class ServeConfig:
    model: Path
    tls_cert: Path
    tls_key: Path
    client_ca: Path
    host: str = "127.0.0.1"
    port: int = 8443
    engine: dict[str, Any] = field(default_factory=dict)  # extra EngineConfig fields
    health_info: dict[str, Any] = field(default_factory=dict)  # added to /health's answer

    def __post_init__(self) -> None:
        for name in ("tls_cert", "tls_key", "client_ca"):
            path = Path(getattr(self, name))
            if not path.is_file():
                raise ValueError(f"{name}: expected a PEM file at {path}; found none")
        mode = stat.S_IMODE(Path(self.tls_key).stat().st_mode)
        if mode & 0o077:
            raise ValueError(f"tls_key: expected file mode 0600 (private); found {mode:04o} (run chmod 600)")
        if not 0 < self.port < 65536:
            raise ValueError(f"port: expected 1-65535; got {self.port}")


def make_app(config: ServeConfig) -> tuple[FastAPI, AsyncEngine]:
    engine = AsyncEngine(EngineConfig(model=config.model, **config.engine))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            await engine.shutdown()

    app = build_app(engine, Path(config.model), health_info=config.health_info)
    app.router.lifespan_context = lifespan
    return app, engine


def uvicorn_config(app: FastAPI, config: ServeConfig) -> Any:
    import uvicorn

    return uvicorn.Config(
        app, host=config.host, port=config.port, log_level="warning",
        ssl_certfile=str(config.tls_cert), ssl_keyfile=str(config.tls_key),
        ssl_ca_certs=str(config.client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED,
        timeout_keep_alive=int(KEEP_ALIVE_S),  # gateways reuse their connections (engine/node_http.py)
    )


def serve(config: ServeConfig) -> None:
    """Blocks until interrupted."""
    import uvicorn

    app, _ = make_app(config)
    uvicorn.Server(uvicorn_config(app, config)).run()
