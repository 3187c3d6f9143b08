"""The HTTPS gateway: tenant API (OpenAI-compatible) and admin API."""

from appliance.gateway.app import create_app

__all__ = ["create_app"]
