#!/usr/bin/env python3
"""Supervisor of the appliance on a node without systemd (containers, evaluation machines).

Installed by sovereign-installer as ROOT/bin/appliancectl and run by its playbooks with the
node's python3; standard library only. Every command prints one JSON object on stdout whose
first key is "sovereign_service" (the installer's event callback forwards it) and exits 0 on
success, 1 on failure.

  start   --root R --exe APPLIANCE --host H --port P --expect-version V [--timeout S]
          Starts `EXE serve --root R --host H --port P` in a new session (setsid), stdout and
          stderr appended to R/logs/appliance.log, pid written atomically to R/run/appliance.pid,
          then waits until https://H:P/health answers with version V, trusting only R/tls/ca.pem.
          EXE is the runtime of the release in service (R/runtimes/<id>/bin/appliance, where
          R/current/release.json names a runtime), else APPLIANCE (the node runtime).
          An appliance already running and healthy on V is left alone (changed: false).
  exec    --root R --exe APPLIANCE
          Replaces itself with `EXE serve --root R` (EXE chosen as for start): the systemd unit's
          ExecStart, so that the unit stays the same whichever runtime a release runs on.
  stop    --root R [--timeout S]
          SIGTERM, wait up to S seconds, then SIGKILL (reported as such).
  status  --root R
          Whether the recorded process is alive, and what it serves.
  health  --root R --host H --port P [--expect-version V] [--timeout S]
          Waits for /health (used after a systemd start).
  nodes   --root R --exe APPLIANCE --action drain|undrain --node NAME [--wait S] [--host H --port P]
          On a gateway node: `EXE nodes drain NAME --root R --wait S --json` (or undrain), with
          EXE chosen as for start; skipped (ok, "skipped": true) when the gateway is not running
          (no live pidfile and no healthy https://H:P/health).
  db      --root R --exe APPLIANCE --action migrate|check [--timeout S]
          On a gateway node: `EXE db migrate --root R --json` (or check), EXE chosen as for start:
          creates or upgrades the tables of the database R/current/appliance.yaml names.

Every command but nodes takes --kind: "gateway" (default; `appliance serve`, R/run/appliance.pid,
R/logs/appliance.log, /health over HTTPS trusting R/tls/ca.pem) or "engine" (the engine node
server of a fleet node: `appliance node serve`, R/run/engine-node.pid, R/logs/engine-node.log,
/health over mutual TLS: R/tls/engine/ca.pem, presenting R/tls/engine/client.pem and client.key).
status without --kind reports both services (top-level fields: the gateway's if it runs).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

LOG_TAIL_LINES = 25
POLL_S = 0.5
KILL_WAIT_S = 10.0
# Variables passed on to the appliance; everything else (ANSIBLE_*, the installer's PyInstaller
# loader paths, proxies) is left behind. The offline switches are set, never assumed.
PASS_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES",
            "CUDA_HOME", "NVIDIA_VISIBLE_DEVICES", "TRITON_CACHE_DIR")
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "PYTHONUNBUFFERED": "1", "NO_PROXY": "*", "no_proxy": "*"}


KINDS = ("gateway", "engine")
DRAIN_STILL_DRAINING = 3  # `appliance nodes drain --wait`: the wait ended with requests still in flight


class Paths:
    def __init__(self, root: str, kind: str = "gateway") -> None:
        self.root = Path(os.path.abspath(root))
        self.kind = kind
        stem = "appliance" if kind == "gateway" else "engine-node"
        self.run = self.root / "run"
        self.pidfile = self.run / f"{stem}.pid"
        self.state = self.run / f"{stem}.json"
        self.logs = self.root / "logs"
        self.log = self.logs / f"{stem}.log"
        tls = self.root / "tls"
        self.ca = tls / "ca.pem" if kind == "gateway" else tls / "engine" / "ca.pem"
        # the engine node server accepts only clients with a certificate of the installation CA
        self.client_cert = None if kind == "gateway" else (tls / "engine" / "client.pem", tls / "engine" / "client.key")

    def serve_args(self) -> list[str]:
        """The subcommand of `appliance` this service runs."""
        return ["serve"] if self.kind == "gateway" else ["node", "serve"]


def emit(ok: bool, **fields: Any) -> int:
    sys.stdout.write(json.dumps({"sovereign_service": "ok" if ok else "failed", **fields}) + "\n")
    return 0 if ok else 1


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_pid(paths: Paths) -> int | None:
    try:
        return int(paths.pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def read_state(paths: Paths) -> dict[str, Any]:
    try:
        data = json.loads(paths.state.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped by init) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def is_our_appliance(pid: int, paths: Paths) -> bool:
    """The pid still names `appliance serve --root ROOT` (`appliance node serve` for the engine
    node server): a recycled pid, or the other service of the node, must not be signalled."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc: trust the pidfile
    args = [a.decode(errors="replace") for a in argv if a]
    if "serve" not in args or str(paths.root) not in args:
        return False
    at = args.index("serve")
    return (at > 0 and args[at - 1] == "node") == (paths.kind == "engine")


def running_pid(paths: Paths) -> int | None:
    pid = read_pid(paths)
    if pid is None or not alive(pid) or not is_our_appliance(pid, paths):
        return None
    return pid


def log_tail(paths: Paths, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with paths.log.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def last_error(text: str) -> str:
    """The line of a log tail that names the error (a traceback's last line), else its last line."""
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if line == line.lstrip() and ("Error" in head or "Exception" in head) and " " not in head:
            return line
    return lines[-1] if lines else "no output"


def probe(paths: Paths, host: str, port: int) -> dict[str, Any] | str:
    """GET /health over HTTPS trusting only the appliance CA: the answer, or why there is none."""
    if not paths.ca.is_file():
        return f"no CA certificate yet at {paths.ca}"
    connect = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    netloc = f"[{connect}]" if ":" in connect else connect
    ctx = ssl.create_default_context(cafile=str(paths.ca))
    if paths.client_cert is not None:
        try:
            ctx.load_cert_chain(str(paths.client_cert[0]), str(paths.client_cert[1]))
        except (OSError, ssl.SSLError) as exc:  # the message names the file, never key material
            return f"no usable engine client certificate at {paths.client_cert[0]} ({type(exc).__name__})"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx))
    try:
        with opener.open(f"https://{netloc}:{port}/health", timeout=5) as resp:
            data = json.loads(resp.read().decode())
    except (OSError, ValueError, ssl.SSLError) as exc:
        return f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
    return data if isinstance(data, dict) else f"unexpected answer {data!r}"


def wait_healthy(paths: Paths, host: str, port: int, expect: str | None, timeout_s: float,
                 proc: subprocess.Popen[bytes] | None = None, pid: int | None = None) -> tuple[bool, str, Any]:
    deadline = time.monotonic() + timeout_s
    last: Any = "not asked yet"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False, f"the appliance exited with code {proc.returncode} before it was healthy", last
        if proc is None and pid is not None and not alive(pid):
            return False, f"the appliance (pid {pid}) exited before it was healthy", last
        last = probe(paths, host, port)
        if isinstance(last, dict) and last.get("status") == "ok":
            if expect is None or str(last.get("version")) == expect:
                return True, "healthy", last
            return False, f"expected /health to report version {expect}, found {last.get('version')}", last
        time.sleep(POLL_S)
    return False, f"expected https://{host}:{port}/health to answer within {timeout_s:.0f} s, last: {last}", last


def child_env(exe: str) -> dict[str, str]:
    env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    if "LD_LIBRARY_PATH_ORIG" in os.environ:  # a PyInstaller loader path leaked this far: undo it
        env["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH_ORIG"]
    path = env.get("PATH", "/usr/local/bin:/usr/bin:/bin")
    env["PATH"] = os.pathsep.join([os.path.dirname(exe), path])
    if not any(env.get(k) for k in ("LC_ALL", "LC_CTYPE", "LANG")):
        env["LC_ALL"] = "C.UTF-8"
    env.update(OFFLINE_ENV)
    return env


def release_exe(paths: Paths, node_exe: str) -> tuple[str, str]:
    """(the `appliance` script that runs the release in service, its runtime id or "node")."""
    try:
        record = json.loads((paths.root / "current" / "release.json").read_text())
    except (OSError, ValueError):
        record = {}
    runtime = record.get("runtime") if isinstance(record, dict) else None
    if isinstance(runtime, str) and runtime and "/" not in runtime and not runtime.startswith("."):
        return str(paths.root / "runtimes" / runtime / "bin" / "appliance"), runtime
    return node_exe, "node"


def missing_exe(exe: str, runtime: str) -> str:
    if runtime == "node":
        return (f"expected the appliance console script at {exe} (inventory nodes[].appliance, or next to the "
                "node's python), found no executable file")
    return (f"expected the release's runtime {runtime} at {exe}, found no executable file; install the "
            "release's bundle again to rebuild the runtime")


def cmd_start(args: argparse.Namespace) -> int:
    paths = Paths(args.root, args.kind)
    pid = running_pid(paths)
    if pid is not None:
        ok, why, health = wait_healthy(paths, args.host, args.port, args.expect_version, args.timeout, pid=pid)
        if ok:
            return emit(True, changed=False, pid=pid, health=health, message=f"already running (pid {pid})")
        return emit(False, changed=False, pid=pid, health=health,
                    message=f"an appliance is already running (pid {pid}) but {why}; stop it first")
    exe, runtime = release_exe(paths, args.exe)
    if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
        return emit(False, changed=False, runtime=runtime, message=missing_exe(exe, runtime))
    for directory in (paths.run, paths.logs):
        directory.mkdir(mode=0o750, parents=True, exist_ok=True)
    argv = [exe, *paths.serve_args(), "--root", str(paths.root), "--host", args.host, "--port", str(args.port)]
    started = time.time()
    log_fd = os.open(paths.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(log_fd, f"--- {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(started))} appliancectl start: "
                         f"{' '.join(argv)}\n".encode())
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=subprocess.STDOUT,
                                cwd=str(paths.root), env=child_env(exe), start_new_session=True, close_fds=True)
    finally:
        os.close(log_fd)
    write_atomic(paths.pidfile, f"{proc.pid}\n")
    state = {"pid": proc.pid, "argv": argv, "host": args.host, "port": args.port, "version": args.expect_version,
             "runtime": runtime, "started_at": started}
    write_atomic(paths.state, json.dumps(state, indent=1) + "\n")
    ok, why, health = wait_healthy(paths, args.host, args.port, args.expect_version, args.timeout, proc=proc)
    elapsed = round(time.time() - started, 3)
    if ok:
        write_atomic(paths.state, json.dumps({**state, "healthy_after_s": elapsed}, indent=1) + "\n")
        return emit(True, changed=True, pid=proc.pid, health=health, start_s=elapsed, runtime=runtime,
                    message=f"started (pid {proc.pid}), healthy after {elapsed:.1f} s")
    if proc.poll() is None:
        stop_pid(proc.pid, paths, KILL_WAIT_S, proc)
    for path in (paths.pidfile, paths.state):
        path.unlink(missing_ok=True)
    tail = log_tail(paths)
    return emit(False, changed=True, pid=proc.pid, start_s=elapsed, log_tail=tail,
                message=f"{why}: {last_error(tail)} (see {paths.log})")


def stop_pid(pid: int, paths: Paths, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> bool:
    """SIGTERM, then SIGKILL after ``timeout_s``. Returns True when SIGKILL was needed."""
    def gone() -> bool:
        return proc.poll() is not None if proc is not None else not alive(pid)

    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if gone():
            return False
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)  # the appliance leads its own session and process group
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return True
    deadline = time.monotonic() + KILL_WAIT_S
    while time.monotonic() < deadline and not gone():
        time.sleep(0.1)
    return True


def cmd_stop(args: argparse.Namespace) -> int:
    paths = Paths(args.root, args.kind)
    pid = running_pid(paths)
    if pid is None:
        stale = paths.pidfile.exists()
        paths.pidfile.unlink(missing_ok=True)
        return emit(True, changed=stale, message="not running" + (" (removed a stale pidfile)" if stale else ""))
    killed = stop_pid(pid, paths, args.timeout)
    if alive(pid):
        return emit(False, changed=True, pid=pid, message=f"appliance (pid {pid}) still alive after SIGKILL")
    paths.pidfile.unlink(missing_ok=True)
    state = read_state(paths)
    if state:  # kept, marked stopped, so that status can say when and what last ran
        write_atomic(paths.state, json.dumps({**state, "stopped_at": time.time(), "killed": killed}, indent=1) + "\n")
    if killed:
        return emit(True, changed=True, pid=pid, killed=True,
                    message=f"appliance (pid {pid}) did not stop within {args.timeout:.0f} s of SIGTERM: "
                            "sent SIGKILL (requests in flight were cut off)")
    return emit(True, changed=True, pid=pid, killed=False, message=f"stopped (pid {pid}) after SIGTERM")


def service_status(paths: Paths) -> dict[str, Any]:
    pid = running_pid(paths)
    state = read_state(paths)
    if pid is None:
        return {"running": False, "pid": None, "version": None, "message": "not running"}
    health = probe(paths, str(state.get("host", "127.0.0.1")), int(state.get("port", 8443)))
    version = health.get("version") if isinstance(health, dict) else state.get("version")
    return {"running": True, "pid": pid, "version": version, "port": state.get("port"),
            "healthy": isinstance(health, dict) and health.get("status") == "ok", "health": health,
            "message": f"running (pid {pid})"}


def cmd_status(args: argparse.Namespace) -> int:
    kinds = [args.kind] if args.kind else list(KINDS)
    services = {kind: service_status(Paths(args.root, kind)) for kind in kinds}
    running = [kind for kind in kinds if services[kind]["running"]]
    top = services[running[0]] if running else services[kinds[0]]
    # one version when every running service reports the same, else none (the rollout restarts)
    versions = {str(services[kind]["version"]) for kind in running}
    version = top["version"] if len(versions) == 1 else None
    return emit(True, changed=False, **{**top, "version": version}, kinds=running, services=services)


def cmd_health(args: argparse.Namespace) -> int:
    paths = Paths(args.root, args.kind)
    ok, why, health = wait_healthy(paths, args.host, args.port, args.expect_version, args.timeout)
    if ok:
        return emit(True, changed=False, health=health, message="healthy")
    tail = log_tail(paths)
    return emit(False, changed=False, health=health, log_tail=tail,
                message=f"{why}: {last_error(tail)} (see {paths.log})")


def cmd_exec(args: argparse.Namespace) -> int:
    paths = Paths(args.root, args.kind)
    exe, runtime = release_exe(paths, args.exe)
    if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
        sys.stderr.write(f"appliancectl exec: {missing_exe(exe, runtime)}\n")
        return 1
    os.chdir(paths.root)
    os.execve(exe, [exe, *paths.serve_args(), "--root", str(paths.root)], child_env(exe))
    return 1  # not reached


def cmd_nodes(args: argparse.Namespace) -> int:
    paths = Paths(args.root, "gateway")
    # under the supervisor its pidfile says; under systemd (no pidfile) the gateway's /health does
    health = probe(paths, args.host, args.port) if running_pid(paths) is None else {"status": "ok"}
    if not (isinstance(health, dict) and health.get("status") == "ok"):
        return emit(True, changed=False, skipped=True, node=args.node, action=args.action,
                    message=f"{args.action} of {args.node} skipped: the gateway is not running on this node")
    exe, runtime = release_exe(paths, args.exe)
    if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
        return emit(False, changed=False, runtime=runtime, message=missing_exe(exe, runtime))
    argv = [exe, "nodes", args.action, args.node, "--root", str(paths.root)]
    if args.action == "drain":
        argv += ["--wait", str(args.wait), "--json"]
    started = time.monotonic()
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=str(paths.root),
                              env=child_env(exe), timeout=args.wait + 60)
    except subprocess.TimeoutExpired:
        return emit(False, changed=False, node=args.node, action=args.action,
                    message=f"`appliance nodes {args.action} {args.node}` did not return within {args.wait + 60:.0f} s")
    elapsed = round(time.monotonic() - started, 3)
    if args.action == "drain" and done.returncode == DRAIN_STILL_DRAINING:
        # the node is restarted anyway: a request stuck longer than the wait must not block an upgrade
        return emit(True, changed=True, node=args.node, action=args.action, seconds=elapsed, timed_out=True,
                    message=f"{args.node} was still draining on the gateway after {args.wait:.0f} s: requests "
                            "still in flight there are cut off by the restart")
    if done.returncode != 0:
        why = last_error(done.stderr or done.stdout)
        return emit(False, changed=False, node=args.node, action=args.action, rc=done.returncode, seconds=elapsed,
                    message=f"`appliance nodes {args.action} {args.node}` on the gateway exited {done.returncode}: "
                            f"{why}")
    return emit(True, changed=True, node=args.node, action=args.action, seconds=elapsed,
                message=f"{args.action}ed {args.node} on the gateway in {elapsed:.1f} s")


def cmd_db(args: argparse.Namespace) -> int:
    paths = Paths(args.root, "gateway")
    exe, runtime = release_exe(paths, args.exe)
    if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
        return emit(False, changed=False, runtime=runtime, message=missing_exe(exe, runtime))
    argv = [exe, "db", args.action, "--root", str(paths.root), "--json"]
    started = time.monotonic()
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=str(paths.root),
                              env=child_env(exe), timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return emit(False, changed=False, action=args.action,
                    message=f"`appliance db {args.action}` did not return within {args.timeout:.0f} s")
    elapsed = round(time.monotonic() - started, 3)
    try:
        report = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        report = {}
    schema = report.get("schema") if isinstance(report, dict) else None
    if done.returncode != 0 or not isinstance(schema, dict):
        why = report.get("message") if isinstance(report, dict) and report.get("message") else last_error(
            done.stderr or done.stdout)
        return emit(False, changed=False, action=args.action, rc=done.returncode, seconds=elapsed,
                    message=f"`appliance db {args.action}` exited {done.returncode}: {why}")
    created = report.get("created_tables") or []
    what = (f"created {len(created)} tables" if created else "added columns" if report.get("changed")
            else "nothing to change")
    return emit(True, changed=bool(report.get("changed")), action=args.action, seconds=elapsed, schema=schema,
                message=f"database {schema.get('database')}: {what}, schema {schema.get('state')} "
                        f"({elapsed:.1f} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="appliancectl", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, timeout in (("start", 300.0), ("stop", 30.0), ("status", 0.0), ("health", 300.0), ("exec", 0.0)):
        p = sub.add_parser(name)
        p.add_argument("--root", required=True)
        p.add_argument("--timeout", type=float, default=timeout)
        if name in ("start", "health"):
            p.add_argument("--host", default="127.0.0.1")
            p.add_argument("--port", type=int, required=True)
            p.add_argument("--expect-version", default=None)
        if name in ("start", "exec"):
            p.add_argument("--exe", required=True)
        # status without --kind: both services
        p.add_argument("--kind", choices=KINDS, default=None if name == "status" else "gateway")
    p = sub.add_parser("nodes")
    p.add_argument("--root", required=True)
    p.add_argument("--exe", required=True)
    p.add_argument("--action", choices=("drain", "undrain"), required=True)
    p.add_argument("--node", required=True)
    p.add_argument("--wait", type=float, default=300.0)
    p.add_argument("--host", default="127.0.0.1")  # the gateway's listen address, for its health probe
    p.add_argument("--port", type=int, default=8443)
    p = sub.add_parser("db")
    p.add_argument("--root", required=True)
    p.add_argument("--exe", required=True)
    p.add_argument("--action", choices=("migrate", "check"), required=True)
    p.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    handler = {"start": cmd_start, "stop": cmd_stop, "status": cmd_status, "health": cmd_health,
               "exec": cmd_exec, "nodes": cmd_nodes, "db": cmd_db}[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
