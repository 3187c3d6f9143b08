"""The gateway's edge: what every request passes before any route sees it.

``EdgeMiddleware`` is a pure ASGI middleware (no per-request body buffering) that
- gives every request an id (``request.state.request_id``) and every response an ``x-request-id``
  header (unless the route set its own), errors included;
- answers 429 ``refusal_budget_exceeded`` at once to a client address or key id past its refusal
  budget (``refusals.py``), before the body is read; and charges every 4xx response to its sources;
- caps concurrent requests (503 ``server_busy``);
- caps the body: a Content-Length over the limit is refused before a byte of body is read, and the
  bytes are counted as they arrive (413 ``request_too_large`` naming the limit); a body not complete
  within ``body_read_timeout_s`` of the request head gets 408 ``body_timeout``; both close the
  connection;
- sets the configured ``RequestLimits`` that the request models check while validating;
- answers an uncaught exception with a 500 envelope that names the request id, and logs the
  traceback on the server only.

``EdgeLimits`` holds every edge limit with its default; ``server.py`` takes the socket-level ones.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass, fields
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.gateway.errors import EdgeRefusal
from appliance.gateway.refusals import RefusalBudget
from appliance.openai_schema import RequestLimits, error_body, request_limits
from appliance.tenancy import KEY_FORMAT

log = logging.getLogger(__name__)
MIB = 1024 * 1024


@dataclass(frozen=True)
class EdgeLimits:
    """Every limit the gateway applies before a request reaches a route (all configuration)."""

    max_body_bytes: int = 4 * MIB
    body_read_timeout_s: float = 30.0  # from the complete request head to the last body byte
    tls_handshake_timeout_s: float = 10.0  # from TCP connection to a complete TLS handshake
    header_read_timeout_s: float = 10.0  # from connection (or the end of the last response) to a complete head
    keep_alive_timeout_s: float = 5.0
    max_connections: int = 1024
    max_concurrent_requests: int = 512
    max_head_bytes: int = 64 * 1024  # request line and headers (h11_max_incomplete_event_size)
    refusals_per_minute: int = 60  # per client address and per key id
    max_messages: int = 2048
    max_total_chars: int = 1_000_000
    max_stop_chars: int = 256
    max_model_chars: int = 256
    max_name_chars: int = 256
    max_schema_chars: int = 65536  # a response_format's JSON schema, serialised

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"edge limit {f.name} must be a number > 0, found {value!r}")
            if f.type in ("int", int) and not isinstance(value, int):
                raise ValueError(f"edge limit {f.name} must be an integer, found {value!r}")
        self.request_limits()  # its own checks

    @classmethod
    def from_mapping(cls, data: dict[str, Any] | None) -> EdgeLimits:
        """From a configuration mapping (e.g. appliance.yaml's ``gateway.limits``); unknown keys
        are refused by name, missing ones keep their defaults."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown edge limits {unknown}; expected some of {sorted(known)}")
        return cls(**data)

    def request_limits(self) -> RequestLimits:
        return RequestLimits(max_messages=self.max_messages, max_total_chars=self.max_total_chars,
                             max_stop_chars=self.max_stop_chars, max_model_chars=self.max_model_chars,
                             max_name_chars=self.max_name_chars, max_schema_chars=self.max_schema_chars)


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


def claimed_key_id(scope: Scope) -> str | None:
    """The key id a bearer token names (not verified: used only to look a budget up, never to
    charge one, so nobody can spend another key's budget with a forged token)."""
    auth = _header(scope, b"authorization")
    if not auth or not auth[:7].lower() == b"bearer ":
        return None
    found = KEY_FORMAT.match(auth[7:].strip().decode("latin-1"))
    return found.group(1) if found else None


async def send_error(send: Send, request_id: str, status: int, message: str, type_: str, code: str,
                     headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error_body(message, type_, code)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
           (b"x-request-id", request_id.encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class EdgeMiddleware:
    def __init__(self, app: ASGIApp, limits: EdgeLimits, refusals: RefusalBudget) -> None:
        self.app = app
        self.limits = limits
        self.refusals = refusals
        self._request_limits = limits.request_limits()
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = f"req-{uuid.uuid4().hex}"
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        client = scope["client"][0] if scope.get("client") else None
        wait = self.refusals.blocked(client, claimed_key_id(scope))
        if wait is not None:
            await send_error(send, request_id, 429, f"too many refused requests from this client; retry in {wait} s",
                             "rate_limit_exceeded", "refusal_budget_exceeded",
                             {"Retry-After": str(wait), "Connection": "close"})
            return
        if self.in_flight >= self.limits.max_concurrent_requests:
            await send_error(send, request_id, 503, f"server busy: {self.limits.max_concurrent_requests} requests "
                             "in progress; retry shortly", "server_error", "server_busy", {"Retry-After": "1"})
            return
        refused = self._check_length(scope)
        if refused is not None:
            await self._refuse(send, request_id, refused, client, state)
            return
        started = False

        async def edge_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", ()))
                if not any(k.lower() == b"x-request-id" for k, _ in headers):
                    headers.append((b"x-request-id", request_id.encode()))
                    message = {**message, "headers": headers}
                status = message["status"]
                if 400 <= status < 500:
                    # An authenticated request's refusal costs its key alone: tenants behind one
                    # address (a NAT, a proxy) never spend each other's budget. A 401's key id is
                    # only claimed, and the unauthenticated are known by their address alone.
                    key_id = None if status == 401 else state.get("key_id")
                    self.refusals.charge(None if key_id else client, key_id)
            await send(message)

        self.in_flight += 1
        token = request_limits.set(self._request_limits)
        try:
            await self.app(scope, self._bounded(receive), edge_send)
        except EdgeRefusal as exc:  # raised where no route's handler answers it
            if not started:
                await self._refuse(send, request_id, exc, client, state)
        except Exception:
            log.exception("request %s failed", request_id)
            if not started:
                await send_error(send, request_id, 500, f"internal error (request id {request_id})",
                                 "server_error", "internal_error")
        finally:
            request_limits.reset(token)
            self.in_flight -= 1

    async def _refuse(self, send: Send, request_id: str, exc: EdgeRefusal, client: str | None,
                      state: dict[str, Any]) -> None:
        self.refusals.charge(client, None)  # before authentication: the address alone
        await send_error(send, request_id, exc.status_code, exc.message, "invalid_request_error", exc.code,
                         dict(exc.headers or {}))

    def _check_length(self, scope: Scope) -> EdgeRefusal | None:
        raw = _header(scope, b"content-length")
        if raw is None:
            return None
        if not raw.strip().isdigit():
            return EdgeRefusal(400, "Content-Length must be a non-negative integer", "invalid_content_length",
                               close=True)
        if int(raw) > self.limits.max_body_bytes:
            return self._too_large(f"Content-Length is {int(raw)} bytes")
        return None

    def _too_large(self, found: str) -> EdgeRefusal:
        return EdgeRefusal(413, f"request body too large: the limit is {self.limits.max_body_bytes} bytes; {found}",
                           "request_too_large", close=True)

    def _bounded(self, receive: Receive) -> Receive:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.body_read_timeout_s
        received = 0
        done = False

        async def bounded_receive() -> Message:
            nonlocal received, done
            if done:  # after the body: http.disconnect waits are not bounded
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise EdgeRefusal(408, f"request body not received within {self.limits.body_read_timeout_s:g} s "
                                  f"({received} bytes arrived)", "body_timeout", close=True) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limits.max_body_bytes:
                    raise self._too_large(f"more than {self.limits.max_body_bytes} bytes arrived")
                done = not message.get("more_body", False)
            else:
                done = True
            return message

        return bounded_receive
