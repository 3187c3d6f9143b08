"""``appliance serve --workers N``: N gateway processes accepting on one port, and their supervisor.

The supervisor (this process) checks the port and opens ONE listening socket; every worker
(``appliance/worker_main.py``, a fresh interpreter) inherits it and accepts on it. A worker that
dies (kill -9, OOM killer, a crash) loses only the connections it had accepted: connections
waiting in the socket's queue stay there for its siblings, and the supervisor starts a new
worker in its place (after 0.5 s, doubling up to 30 s while replacements die within 30 s of
starting). Worker 0 starts first and the others once it serves (it does the once-per-database
work of opening: see ``gateway_roles``). If a worker of the first start exits before serving,
everything is stopped and the exit code is 1: the worker printed why.

SIGINT (Ctrl-C) or SIGTERM stops the supervisor: each worker gets SIGTERM and stops gracefully
(in-flight requests finish within the server's graceful timeout, final audit records,
checkpoint); workers still running after ``stop_timeout_s`` are killed. Exit code 0 when every
worker stopped cleanly. Workers run in their own process group, so a terminal's Ctrl-C reaches
only the supervisor, which then stops them in order; a worker whose supervisor is gone stops itself.

Every worker is a whole gateway on the shared database: it needs ``fleet:`` nodes, because an
in-process engine cannot be shared by several processes (``check_can_run_workers``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.config import ApplianceConfig
from appliance.errors import ConfigError, PortInUseError
from appliance.server import check_port_free, tls_for

log = logging.getLogger(__name__)
RESTART_DELAY_S = 0.5
RESTART_DELAY_MAX_S = 30.0
QUICK_DEATH_S = 30.0


def check_can_run_workers(config: ApplianceConfig, workers: int) -> None:
    """Refuse ``workers`` > 1 for an install whose engine runs in the gateway process."""
    if workers < 1:
        raise ConfigError(f"--workers: expected 1 or more gateway processes, found {workers}")
    if workers > 1 and not config.fleet.nodes:
        raise ConfigError(
            f"{workers} gateway workers need engine nodes: this install runs the engine inside the gateway "
            f"process (appliance.yaml has no fleet: nodes), and one engine cannot be shared by several "
            f"processes. Run the engine as a node (`appliance node serve --root ROOT`, listening on "
            f"engine_node.port, {config.engine_node.host}:{config.engine_node.port} here) and list it under "
            f"fleet.nodes in appliance.yaml (url https://HOST:PORT), or serve with --workers 1")


def listening_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    check_port_free(host, port)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PortInUseError(f"cannot bind {host}:{port}: {exc.strerror}") from exc
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen[bytes]
    ready_fd: int | None  # our end of its ready pipe, until it said ready
    started_at: float
    ready: bool = False


class Supervisor:
    def __init__(self, config: ApplianceConfig, host: str, port: int, workers: int, *,
                 say: Callable[[str], None] = print, stop_timeout_s: float = 40.0,
                 start_timeout_s: float = 300.0) -> None:
        check_can_run_workers(config, workers)
        self.config, self.host, self.port, self.count = config, host, port, workers
        self.say = say
        self.stop_timeout_s = stop_timeout_s
        self.start_timeout_s = start_timeout_s
        self.workers: dict[int, Worker] = {}
        self.restarts = 0
        self._stop = threading.Event()
        self._sock: socket.socket | None = None

    # ---- the whole life -------------------------------------------------------------------
    def run(self) -> int:
        """Serve until SIGINT/SIGTERM; the process's exit code."""
        tls_for(self.config, self.host)  # made once here (a development root), not raced by N workers
        self._sock = listening_socket(self.host, self.port)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            for index in range(self.count):
                if not self._start_and_wait(index):
                    stopped = self._stop_all()  # a Ctrl-C during the start is a clean stop, a failure is not
                    return stopped if self._stop.is_set() else 1
            self.say(f"serving on https://{self.host}:{self.port} with {self.count} workers "
                     f"(pids {', '.join(str(w.proc.pid) for w in self.workers.values())})")
            self._supervise()
            return self._stop_all()
        finally:
            self._stop_all()
            self._sock.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, _sig: int, _frame: object) -> None:
        self._stop.set()

    def _start_and_wait(self, index: int) -> bool:
        worker = self._spawn(index)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline and not self._stop.is_set():
            self._read_ready(0.2)
            if worker.ready:
                return True
            if worker.proc.poll() is not None:
                self.say(f"worker {index} exited with code {worker.proc.returncode} before serving: stopping")
                return False
        if not self._stop.is_set():
            self.say(f"worker {index} did not serve within {self.start_timeout_s:.0f} s: stopping")
        return False

    def _supervise(self) -> None:
        due: dict[int, float] = {}  # index -> when to start its replacement
        delays: dict[int, float] = {}
        while not self._stop.is_set():
            self._read_ready(0.2)
            now = time.monotonic()
            for index, worker in list(self.workers.items()):
                if index in due or worker.proc.poll() is None:
                    continue
                quick = now - worker.started_at < QUICK_DEATH_S
                delay = min(delays.get(index, RESTART_DELAY_S / 2) * 2, RESTART_DELAY_MAX_S) if quick \
                    else RESTART_DELAY_S
                delays[index] = delay
                due[index] = now + delay
                self.say(f"worker {index} (pid {worker.proc.pid}) died ({_how(worker.proc.returncode)}): "
                         f"starting a new one in {delay:.1f} s")
            for index, when in list(due.items()):
                if now >= when and not self._stop.is_set():
                    del due[index]
                    self._close_ready(self.workers[index])
                    self._spawn(index)
                    self.restarts += 1

    def _stop_all(self) -> int:
        live = [w for w in self.workers.values() if w.proc.poll() is None]
        for worker in live:
            with contextlib.suppress(ProcessLookupError):
                worker.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        code = 0
        for worker in self.workers.values():
            try:
                rc = worker.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.say(f"worker {worker.index} (pid {worker.proc.pid}) did not stop within "
                         f"{self.stop_timeout_s:.0f} s: killed")
                worker.proc.kill()
                rc = worker.proc.wait()
            if worker in live and rc != 0:
                self.say(f"worker {worker.index} (pid {worker.proc.pid}) stopped with {_how(rc)}")
                code = 1
            self._close_ready(worker)
        self.workers.clear()
        return code

    # ---- one worker -----------------------------------------------------------------------
    def _spawn(self, index: int) -> Worker:
        assert self._sock is not None
        ready_r, ready_w = os.pipe()
        fd = self._sock.fileno()
        argv = [sys.executable, "-m", "appliance.worker_main", "--root", str(self.config.root), "--index", str(index),
                "--fd", str(fd), "--ready-fd", str(ready_w), "--parent", str(os.getpid())]
        try:
            proc = subprocess.Popen(argv, pass_fds=(fd, ready_w), start_new_session=True)
        finally:
            os.close(ready_w)
        worker = Worker(index, proc, ready_r, time.monotonic())
        self.workers[index] = worker
        return worker

    def _read_ready(self, timeout_s: float) -> None:
        fds = {w.ready_fd: w for w in self.workers.values() if w.ready_fd is not None}
        if not fds:
            self._stop.wait(timeout_s)
            return
        try:
            readable, _, _ = select.select(list(fds), [], [], timeout_s)
        except InterruptedError:  # a signal: the loop looks at _stop
            return
        for fd in readable:
            worker = fds[fd]
            data = os.read(fd, 64)
            worker.ready = worker.ready or data.startswith(b"ready")
            if not data or worker.ready:  # said ready, or closed its end (it died before serving)
                self._close_ready(worker)

    @staticmethod
    def _close_ready(worker: Worker) -> None:
        if worker.ready_fd is not None:
            os.close(worker.ready_fd)
            worker.ready_fd = None


def _how(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


def serve_workers(root: Path, host: str | None, port: int | None, workers: int,
                  say: Callable[[str], None] = print) -> int:
    from appliance.config import load_config

    config = load_config(root)
    return Supervisor(config, host or config.host, port or config.port, workers, say=say).run()
