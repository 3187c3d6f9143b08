"""Helpers for tests that drive the real appliance as a user would: bundle, installer, server."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent


def tls_ctx(ca: Path | str) -> ssl.SSLContext:
    """A client context that trusts only the appliance's own CA."""
    return ssl.create_default_context(cafile=str(ca))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class VendorBundle:
    bundle: Path
    trusted_root: Path


def build_demo_bundle(workdir: Path, model_dir: Path, version: str = "0.1.0") -> VendorBundle:
    from airgap_bundle import build_bundle, init_keys
    from policies import default_policy_dir

    keys = workdir / "keys"
    if not (keys / "root.json").exists():
        init_keys(keys)
    bundle = workdir / f"appliance-{version}.tar"
    if not bundle.exists():
        build_bundle(bundle, keys, version, dt.datetime.now(dt.UTC) + dt.timedelta(days=30),
                     model_dir=model_dir, policies_dir=default_policy_dir())
    return VendorBundle(bundle, keys / "root.json")


def write_inventory(path: Path, port: int) -> Path:
    path.write_text(
        f"gateway: {{host: 127.0.0.1, port: {port}}}\n"
        "firewall: {mode: render}\n"  # never enforce an egress firewall on the test machine itself
        "nodes:\n"
        "  - name: local\n"
        "    connection: local\n"
        "    labels: {region: eu-test, site: lab, classification: internal}\n"
    )
    return path


def run_installer(vendor: VendorBundle, root: Path, port: int) -> subprocess.CompletedProcess[str]:
    """Install as an IT admin would on a CPU-only machine, gateway on ``port``; the test serves it."""
    root.mkdir(parents=True, exist_ok=True)
    inventory = write_inventory(root.parent / f"{root.name}-inventory.yaml", port)
    return subprocess.run(
        [str(BIN / "sovereign-installer"), "install", "--bundle", str(vendor.bundle),
         "--trusted-root", str(vendor.trusted_root), "--root", str(root), "--inventory", str(inventory),
         "--allow-cpu", "--no-start"],
        text=True, capture_output=True, env={**os.environ, "LC_ALL": "C.UTF-8"}, timeout=600,
    )


def wait_healthy(proc: subprocess.Popen[str] | None, url: str, ca: Path, timeout_s: float = 300) -> None:
    """Until ``url``'s /health answers 200 over TLS with ``ca``; fails early if ``proc`` (a
    gateway process; ``None`` for one served in this process) exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"appliance exited with {proc.returncode} before becoming healthy:\n{out}")
        if ca.exists():
            try:
                if httpx.get(f"{url}/health", verify=tls_ctx(ca), timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    raise AssertionError(f"appliance at {url} not healthy within {timeout_s} s")


def start(cmd: list[str], url: str, ca: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(cmd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "LC_ALL": "C.UTF-8"})
    try:
        wait_healthy(proc, url, ca)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


def _child_map() -> dict[int, list[int]]:
    """parent pid -> its children's pids, from /proc."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return parents


def children(pid: int) -> list[int]:
    return _child_map().get(pid, [])


def descendants(pid: int) -> list[int]:
    """Every process below pid (children first)."""
    parents = _child_map()
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found.extend(kids)
        todo.extend(kids)
    return found


def interrupt(proc: subprocess.Popen[str], timeout_s: float = 60) -> tuple[int, str]:
    """Ctrl-C, as a user would; returns the exit code and everything the process printed.

    If it does not stop in time, it and everything it started are killed before failing (a
    surviving child would hold the output pipe open and hang the test run)."""
    family = descendants(proc.pid)
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *family, *descendants(proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        raise AssertionError(f"appliance did not stop within {timeout_s} s of Ctrl-C:\n{out}") from None
    return proc.returncode, out
