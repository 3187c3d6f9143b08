"""Run the gateway over HTTPS with uvicorn, after checking the port is free."""

from __future__ import annotations

import contextlib
import errno
import signal
import socket
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import uvicorn

from appliance.errors import PortInUseError
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


def tls_for(runtime: Runtime, host: str) -> TlsFiles:
    """The installer-issued material when ROOT/tls holds it (checked, used as it is: a problem is a
    TlsError, never a silent replacement), else a self-made CA and certificate (development)."""
    issued = installer_tls(runtime.config.tls_dir, host)
    if issued is not None:
        return issued
    hosts = sorted({host, "localhost", "127.0.0.1"} - {"0.0.0.0", "::"})
    return ensure_tls(runtime.config.tls_dir, hosts)


class GracefulServer(uvicorn.Server):
    """Ctrl-C and SIGTERM stop the appliance gracefully and the process then exits 0.

    uvicorn re-raises a caught signal after its graceful shutdown (so the process would end in a
    KeyboardInterrupt traceback); for an appliance a requested stop is a normal, clean exit.
    """

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


def build_server(runtime: Runtime, host: str, port: int) -> uvicorn.Server:
    from appliance.gateway import create_app

    check_port_free(host, port)
    tls = tls_for(runtime, host)
    config = uvicorn.Config(
        create_app(runtime), host=host, port=port, ssl_certfile=str(tls.cert), ssl_keyfile=str(tls.key),
        log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=10,
    )
    return GracefulServer(config)
