"""A TCP relay for tests: listens on one address and copies each connection's bytes, unchanged,
both ways, to a fixed target. The SSH hosts (network namespaces, tests/installer/sshhosts.py)
reach the controller only at its bridge address, while the test PostgreSQL listens on 127.0.0.1;
the relay on the bridge address joins the two (TLS and the PostgreSQL protocol pass through it).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

CHUNK = 65536


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(CHUNK):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


class TcpRelay:
    def __init__(self, listen_host: str, target: tuple[str, int]) -> None:
        self.target = target
        self.sock = socket.create_server((listen_host, 0))
        self.port = int(self.sock.getsockname()[1])
        self.connections = 0
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name="tcp-relay", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(self.target, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.connections += 1
                self._open += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()

    def close(self) -> None:
        self.sock.close()
        with self._lock:
            for conn in self._open:
                with contextlib.suppress(OSError):
                    conn.close()
        self._thread.join(timeout=5)


@contextlib.contextmanager
def tcp_relay(listen_host: str, target: tuple[str, int]) -> Iterator[TcpRelay]:
    relay = TcpRelay(listen_host, target)
    try:
        yield relay
    finally:
        relay.close()
