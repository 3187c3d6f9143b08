"""One gateway worker: a whole gateway process serving on a listening socket it inherited.

Started by the supervisor (``appliance/workers.py``), never by hand::

    python -m appliance.worker_main --root ROOT --index I --fd F --ready-fd W

It opens its own runtime on the shared database (its own run marker: ``gateway_roles``), keeps
the background jobs its index is given, serves HTTPS on socket ``F`` with the same server as a
one-process gateway, writes ``ready`` to ``W`` once it accepts, and stops gracefully (exit 0) on
SIGTERM or SIGINT, or when its supervisor is gone (it is then an orphan nobody would restart).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from appliance.errors import ApplianceError
from appliance.gateway_roles import apply_roles, open_runtime


def _watch_parent(server: object, parent: int, every_s: float = 1.0) -> None:
    def watch() -> None:
        stop = threading.Event()
        while not stop.wait(every_s):
            if os.getppid() != parent:
                logging.getLogger(__name__).warning("supervisor (pid %d) is gone: stopping", parent)
                server.handle_exit(signal.SIGTERM, None)  # type: ignore[attr-defined]
                return

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="appliance-worker")
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--fd", type=int, required=True, help="the listening socket, inherited")
    parser.add_argument("--ready-fd", type=int, required=True, help="a pipe: 'ready' is written once serving")
    parser.add_argument("--parent", type=int, required=True, help="the supervisor's pid")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"worker {args.index}: %(levelname)s %(name)s: %(message)s")
    from appliance.server import build_server

    sock = socket.socket(fileno=args.fd)
    try:
        runtime = open_runtime(args.root, args.index)
        apply_roles(runtime, args.index)
        host, port = sock.getsockname()[:2]
        server = build_server(runtime, str(host), int(port), inherited_socket=True)
    except ApplianceError as exc:
        print(f"error: worker {args.index}: {exc}", file=sys.stderr)
        return 1

    def ready() -> None:
        try:
            os.write(args.ready_fd, b"ready\n")
        except OSError:
            pass  # the supervisor stopped listening: it will see this worker by its pid anyway
        finally:
            os.close(args.ready_fd)

    server.on_started = ready
    _watch_parent(server, args.parent)
    server.run(sockets=[sock])
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
