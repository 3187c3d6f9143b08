"""Who is on the other end of a request, as audit records carry it (NIST SP 800-53 AU-3).

``client_ip`` is the TCP peer's address as the server saw it. It is never taken from
``X-Forwarded-For`` or ``Forwarded``: any client can send those, and the appliance has no
trusted-proxy setting (put no proxy in front of it, or read the proxy's own log for the origin).
``user_agent`` is the ``User-Agent`` header, at most ``MAX_USER_AGENT`` characters, with control
and format characters (newlines, escapes, bidirectional overrides) replaced by U+FFFD so that a
record shown in a terminal or a SIEM cannot fake other lines.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from typing import Any

MAX_USER_AGENT = 256
REPLACEMENT = "\ufffd"
UNKNOWN = "unknown"


def clean_text(raw: str, limit: int = MAX_USER_AGENT) -> str:
    """``raw`` in at most ``limit`` characters (the last a "…" when cut), control and format
    characters replaced."""
    cut = raw if len(raw) <= limit else raw[: limit - 1] + "…"
    return "".join(REPLACEMENT if unicodedata.category(c) in ("Cc", "Cf") else c for c in cut)


def user_agent(headers: Any) -> str:
    """The cleaned ``User-Agent`` of ASGI raw headers (``[(b"name", b"value")]``); "" when absent."""
    for name, value in headers or ():
        if bytes(name).lower() == b"user-agent":
            # bytes beyond the limit are never decoded; latin-1 as HTTP/1.1 headers are
            return clean_text(bytes(value[: MAX_USER_AGENT * 2]).decode("latin-1"))
    return ""


def client_fields(scope: Mapping[str, Any]) -> dict[str, str]:
    """``{"client_ip", "user_agent"}`` of an ASGI scope (a request's ``scope``)."""
    client = scope.get("client")
    return {"client_ip": str(client[0]) if client else UNKNOWN, "user_agent": user_agent(scope.get("headers"))}
