"""uvicorn's h11 protocol with a request-head deadline and a connection cap.

uvicorn closes idle keep-alive connections, but a client that sends its request head one byte at a
time resets that timer with each byte and holds the connection (and a slot of
``limit_concurrency``) forever. This protocol gives every request head ``header_read_timeout_s``
from the moment the connection is ready (after the TLS handshake) or the previous response ended:
a head still incomplete then is answered 408 and the connection closed (a connection on which no
byte of a new request arrived is closed silently, as keep-alive expiry is). Connections beyond
``max_connections`` are closed as soon as they are made, and a head over ``max_head_bytes`` is
refused. uvicorn's own plain-text 400 for an unparsable request is the OpenAI error envelope here
too.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from appliance.openai_schema import error_body


def _raw_response(status: int, reason: str, message: str, code: str) -> bytes:
    request_id = f"req-{uuid.uuid4().hex}"
    body = json.dumps(error_body(message, "invalid_request_error", code)).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"x-request-id: {request_id}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


SHUTDOWN_GRACE_S = 1.0
CUT_AFTER_REFUSAL_S = 1.0  # at most this long for a refusal's answer to leave before the connection is cut


class DeadlineH11Protocol(H11Protocol):
    header_read_timeout_s: float = 10.0
    max_connections: int = 1024
    max_head_bytes: int = 64 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0  # bytes of the current, incomplete request head
        self._head_buf = bytearray()  # the same bytes, until the end of the head is found

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.abort()  # no room: refused before anything is read or parsed
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            self._head_bytes += len(data)
            if self._head_too_large(data):
                return
        super().data_received(data)
        if self._head_timer is not None and self.conn.their_state is not h11.IDLE:
            self._cancel_head_timer()  # the head is complete; the edge middleware bounds the body

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_head_timer()  # the next request on this connection gets its own deadline
        elif self.transport.is_closing() and self.conn.their_state is h11.SEND_BODY:
            # Refused mid-body (413, 408) and closing: a TLS close waits for the client's
            # close_notify and reads (and drops) whatever it still sends meanwhile (uvloop's TLS
            # does), so a client that keeps sending would push its whole body through. Cut it as
            # soon as the answer has left.
            self._cut_when_sent(CUT_AFTER_REFUSAL_S)

    def shutdown(self) -> None:
        """Graceful shutdown: an idle connection is closed at once, as uvicorn does, but over TLS
        that close waits for the client's close_notify, which an idle keep-alive client never sends
        (asyncio waits up to 30 s, past the server's graceful-shutdown timeout). It is cut after a
        second instead, so Ctrl-C stops the appliance promptly and cleanly."""
        idle = self.cycle is None or self.cycle.response_complete
        super().shutdown()
        if idle:
            self.loop.call_later(SHUTDOWN_GRACE_S, self._abort_if_open)

    def _cut_when_sent(self, patience_s: float) -> None:
        if getattr(self, "_lost", False):
            return
        if self.transport.get_write_buffer_size() and patience_s > 0:
            self.loop.call_later(0.01, self._cut_when_sent, patience_s - 0.01)
            return
        self._abort_if_open()

    def _abort_if_open(self) -> None:
        if self.transport is not None and not getattr(self, "_lost", False):
            self.transport.abort()

    def send_400_response(self, msg: str) -> None:
        self._cancel_head_timer()
        self.transport.write(_raw_response(400, "Bad Request", f"malformed HTTP request: {msg}", "invalid_http"))
        self.transport.close()

    def _head_too_large(self, data: bytes) -> bool:
        """Whether the request head being received is over ``max_head_bytes`` (then answered and
        closed). h11 checks its own limit only while a head is incomplete, and TLS hands over up to
        256 KiB at once, so a whole oversized head would pass it in one read."""
        self._head_buf += data
        end = self._head_buf.find(b"\r\n\r\n")
        size = len(self._head_buf) if end == -1 else end
        if size > self.max_head_bytes:
            self._cancel_head_timer()
            self.transport.write(_raw_response(
                400, "Bad Request", f"request head too large: the limit is {self.max_head_bytes} bytes",
                "header_too_large"))
            self.transport.close()
            return True
        if end != -1:
            self._head_buf = bytearray()
        return False

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_bytes = 0
        self._head_buf = bytearray()
        self._head_timer = self.loop.call_later(self.header_read_timeout_s, self._head_timeout)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self._head_bytes:
            self.transport.write(_raw_response(
                408, "Request Timeout",
                f"request head not received within {self.header_read_timeout_s:g} s", "header_timeout"))
        self.transport.close()


def deadline_protocol(header_read_timeout_s: float, max_connections: int,
                      max_head_bytes: int = 64 * 1024) -> type[DeadlineH11Protocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` with these limits."""
    return type("ConfiguredDeadlineH11Protocol", (DeadlineH11Protocol,), {
        "header_read_timeout_s": float(header_read_timeout_s), "max_connections": int(max_connections),
        "max_head_bytes": int(max_head_bytes),
    })
