"""This host's engine node server (``appliance node serve``): the release's model behind mutual TLS.

Certificates are the installer's: ROOT/tls/engine/server.pem and server.key (mode 0600) for the
server, ROOT/tls/engine/ca.pem as the only CA whose client certificates are accepted (the
gateways hold client certificates from it). There is no mode without client certificates.
``/health`` answers the release version, node name and served models, so the installer's
supervisor can wait for the right release.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from rich.console import Console

from appliance.config import load_config
from appliance.errors import ConfigError


def serve_node(root: Path, host: str | None, port: int | None, console: Console) -> None:
    import uvicorn

    from engine.server.serve import ServeConfig, make_app, uvicorn_config

    config = load_config(root)
    if "engine" not in config.node.roles:
        raise ConfigError(f"node {config.node.name} has roles {list(config.node.roles)}: no engine to serve "
                          "(expected 'engine' among node.roles in appliance.yaml)")
    tls = config.tls_dir / "engine"
    for name in ("server.pem", "server.key", "ca.pem"):
        if not (tls / name).is_file():
            raise ConfigError(f"missing {tls / name}: the engine node server needs the installer-issued "
                              "certificate, key and CA (run sovereign-installer install)")
    for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}.items():
        os.environ[key] = value
    settings = config.engine.resolved(cuda_available=torch.cuda.is_available())
    try:
        serve_config = ServeConfig(
            model=config.model_path, tls_cert=tls / "server.pem", tls_key=tls / "server.key", client_ca=tls / "ca.pem",
            host=host or config.engine_node.host, port=port or config.engine_node.port, engine=settings,
            health_info={"version": config.version, "node": config.node.name, "models": list(config.served_models)})
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    app, _ = make_app(serve_config)
    server = uvicorn.Server(uvicorn_config(app, serve_config))
    console.print(f"engine node {config.node.name} serving {', '.join(config.served_models)} on "
                  f"https://{serve_config.host}:{serve_config.port} (mutual TLS)")
    server.run()
