"""A node server (engine/server) over real mutual TLS in a thread of the test process, for the
engine tests that drive it through RemoteEngine."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.server.serve import ServeConfig, make_app, uvicorn_config
from tests.engine.tls_certs import TlsSet


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def node_server(model_dir: Path, tls: TlsSet, engine: dict[str, Any] | None = None) -> Iterator[str]:
    """Its https:// URL while it runs; stopped on exit."""
    import uvicorn

    config = ServeConfig(model=model_dir, tls_cert=tls.server.cert, tls_key=tls.server.key, client_ca=tls.ca,
                         port=free_port(), engine=engine or {})
    app, _ = make_app(config)
    server = uvicorn.Server(uvicorn_config(app, config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("node server did not start")
        time.sleep(0.05)
    try:
        yield f"https://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
