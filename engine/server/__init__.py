"""The engine's internal node server: streaming generation over mutual TLS, health, metrics."""

from engine.server.app import build_app
from engine.server.serve import ServeConfig, serve

__all__ = ["ServeConfig", "build_app", "serve"]
