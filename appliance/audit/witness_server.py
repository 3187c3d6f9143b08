"""The witness's HTTP(S) front: ``POST /add-checkpoint`` onto ``WitnessState``, and
``GET /checkpoint/<origin>`` for the newest checkpoint it cosigned (read-only).

Standard library only (``http.server``): the witness is meant to run on a small separate box.
Bodies are bounded (413 before reading a byte more than ``max_body``; 411 without a length),
every connection has a read timeout, and with ``tls`` the TLS handshake happens on the
connection's own thread, so a client that stalls in it holds up no one else. Mutual TLS: give a
client CA and only clients with a certificate from it get past the handshake.
"""

from __future__ import annotations

import logging
import ssl
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from appliance.audit.witness import Answer, WitnessError, WitnessState

log = logging.getLogger("appliance.audit.witness")

DEFAULT_MAX_BODY = 64 * 1024


def server_tls_context(cert: Path, key: Path, client_ca: Path | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
        if client_ca is not None:
            context.load_verify_locations(cafile=str(client_ca))
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise WitnessError(f"witness TLS: expected a readable certificate, key and CA, found {exc}") from None
    return context


class WitnessServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], state: WitnessState, *, tls: ssl.SSLContext | None = None,
                 max_body: int = DEFAULT_MAX_BODY, timeout_s: float = 10.0) -> None:
        if max_body < 1024:
            raise WitnessError(f"witness max body: expected at least 1024 bytes, found {max_body}")
        self.state = state
        self.tls = tls
        self.max_body = max_body
        self.timeout_s = timeout_s
        super().__init__(address, _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(self.timeout_s)
        if self.tls is not None:
            try:
                request = self.tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                log.info("TLS handshake with %s refused: %s", client_address[0], exc)
                request.close()
                return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.warning("witness connection from %s failed", client_address[0], exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: WitnessServer
    protocol_version = "HTTP/1.1"
    server_version = "sovereign-witness"

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.client_address[0], format % args)

    def _send(self, answer: Answer, *, close: bool = False) -> None:
        data = answer.body.encode("utf-8")
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.content_type)
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        """``GET /checkpoint/<origin, percent-encoded>``: the newest checkpoint cosigned for it
        (the log's note plus the cosignature), so a verifier can anchor to what the witness holds."""
        prefix = "/checkpoint/"
        origin = unquote(self.path[len(prefix):]) if self.path.startswith(prefix) else ""
        if not origin or "/" in self.path[len(prefix):]:
            self._send(Answer(404, f"expected GET /checkpoint/<origin, percent-encoded>, found {self.path[:80]}\n"))
            return
        path = self.server.state.path_of(origin)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            self._send(Answer(404, f"no checkpoint cosigned for origin {origin[:200]!r}\n"))
            return
        except (OSError, UnicodeDecodeError) as exc:
            log.error("witness state %s unreadable: %s", path, exc)
            self._send(Answer(500, "witness state unreadable; see the witness log\n"))
            return
        self._send(Answer(200, text))

    def do_POST(self) -> None:
        if self.path != "/add-checkpoint":
            self._send(Answer(404, f"expected POST /add-checkpoint, found POST {self.path[:80]}\n"), close=True)
            return
        length_text = self.headers.get("Content-Length")
        if length_text is None or not length_text.isdigit():
            self._send(Answer(411, "expected a Content-Length header with the body size\n"), close=True)
            return
        length = int(length_text)
        if length > self.server.max_body:
            self._send(Answer(413, f"request body: expected at most {self.server.max_body} bytes, "
                                   f"found {length}\n"), close=True)
            return
        try:
            body = self.rfile.read(length)
        except OSError:
            self.close_connection = True
            return
        if len(body) != length:
            self._send(Answer(400, f"request body: expected {length} bytes, found {len(body)}\n"), close=True)
            return
        try:
            answer = self.server.state.add_checkpoint(body)
        except WitnessError as exc:
            log.error("%s", exc)
            answer = Answer(500, "witness state unreadable; see the witness log\n")
        except OSError as exc:
            log.error("witness could not store its state: %s", exc)
            answer = Answer(500, "witness could not store its state; nothing cosigned\n")
        self._send(answer)
