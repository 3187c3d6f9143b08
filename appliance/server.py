"""Run the gateway over HTTPS with uvicorn, after checking the port is free (or on a listening
socket handed down by the worker supervisor, ``appliance/workers.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import uvicorn

from appliance.config import ApplianceConfig
from appliance.errors import PortInUseError
from appliance.gateway.edge import EdgeLimits
from appliance.gateway.protocol import deadline_protocol
from appliance.tls import TlsFiles, ensure_tls, installer_tls

if TYPE_CHECKING:
    from appliance.runtime import Runtime


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As uvicorn does: connections of a previous run in TIME_WAIT must not count as "in use".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUseError(
                    f"port {port} on {host} is already in use: stop whatever holds it "
                    f"(`ss -ltnp 'sport = :{port}'`) or choose another with --port"
                ) from exc
            raise PortInUseError(f"cannot bind {host}:{port}: {exc.strerror}") from exc


def tls_for(runtime: Runtime | ApplianceConfig, host: str) -> TlsFiles:
    """The installer-issued material when ROOT/tls holds it (checked, used as it is: a problem is a
    TlsError, never a silent replacement), else a self-made CA and certificate (development)."""
    config = runtime if isinstance(runtime, ApplianceConfig) else runtime.config
    issued = installer_tls(config.tls_dir, host)
    if issued is not None:
        return issued
    hosts = sorted({host, "localhost", "127.0.0.1"} - {"0.0.0.0", "::"})
    return ensure_tls(config.tls_dir, hosts)


class GracefulServer(uvicorn.Server):
    """Ctrl-C and SIGTERM stop the appliance gracefully and the process then exits 0.

    uvicorn re-raises a caught signal after its graceful shutdown (so the process would end in a
    KeyboardInterrupt traceback); for an appliance a requested stop is a normal, clean exit.
    """

    def __init__(self, config: uvicorn.Config, tls_handshake_timeout_s: float = 60.0) -> None:
        super().__init__(config)
        self.tls_handshake_timeout_s = tls_handshake_timeout_s
        self.on_started: Callable[[], None] | None = None  # called once the app's startup is done and it accepts
        self.on_stopped: list[Callable[[], None]] = []  # called (in a thread) after the server has stopped

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().serve(sockets)
        finally:
            for stopped in self.on_stopped:
                await asyncio.to_thread(stopped)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's startup, with a deadline on each TLS handshake: uvicorn does not pass one to
        ``loop.create_server``, so a client that never finishes its handshake would hold its socket
        for asyncio's default 60 s (before the protocol, and its head deadline, ever see it)."""
        loop = asyncio.get_running_loop()
        create_server = loop.create_server
        loop.create_server = functools.partial(  # type: ignore[method-assign]
            create_server, ssl_handshake_timeout=self.tls_handshake_timeout_s)
        try:
            await super().startup(sockets)
        finally:
            del loop.create_server  # the loop's own method again
        if self.started and self.on_started is not None:
            self.on_started()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)


def configured_limits(runtime: Runtime) -> EdgeLimits:
    """The edge limits of the installed configuration (``config.edge`` once appliance.yaml carries
    them), else the defaults."""
    limits = getattr(runtime.config, "edge", None)
    return limits if isinstance(limits, EdgeLimits) else EdgeLimits()


def build_server(runtime: Runtime, host: str, port: int, limits: EdgeLimits | None = None, *,
                 inherited_socket: bool = False) -> GracefulServer:
    """uvicorn over TLS with the edge limits on the sockets: a deadline for each request head (the
    protocol), a connection cap, a concurrency cap, a keep-alive timeout and a cap on the size of
    a request head; the app adds the body and request limits.

    ``inherited_socket``: the caller runs it with ``server.run(sockets=[...])`` on a socket that is
    already listening (a worker of ``appliance/workers.py``), so the port is not checked here.
    The database's key events are attached to the key cache (``appliance/key_events.py``) and
    closed when the server stops."""
    from appliance import key_events
    from appliance.gateway import create_app
    from appliance.gateway.refusal_audit import install as install_refusal_audit

    limits = limits or configured_limits(runtime)
    if not inherited_socket:
        check_port_free(host, port)
    tls = tls_for(runtime, host)
    cache = runtime.tenants.cache
    events = None if cache.events is not None else key_events.attach(runtime.db, cache)
    app = create_app(runtime, limits=limits)
    install_refusal_audit(app)  # outermost, so that the edge's own refusals are recorded too
    config = uvicorn.Config(
        app, host=host, port=port, ssl_certfile=str(tls.cert),
        ssl_keyfile=str(tls.key), log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=10,
        http=deadline_protocol(limits.header_read_timeout_s, limits.max_connections, limits.max_head_bytes),
        # The protocol refuses connections past max_connections first; uvicorn's own cap (a plain-text
        # 503) is a backstop one above it, for tasks that outlive their connection.
        limit_concurrency=limits.max_connections + 1,
        timeout_keep_alive=max(1, round(limits.keep_alive_timeout_s)),
        h11_max_incomplete_event_size=limits.max_head_bytes,
    )
    server = GracefulServer(config, tls_handshake_timeout_s=limits.tls_handshake_timeout_s)
    if events is not None:
        server.on_stopped.append(events.close)
    return server
