"""The IT admin's journey with the frozen `sovereign-installer`, run by test_frozen.py inside a
network namespace that has only loopback (when the machine allows one).

    python -m tests.installer.frozen_journey EXE V1 V2 BROKEN TRUSTED_ROOT WORKDIR

Runs the executable with a bare environment (PATH=/usr/bin:/bin, no locale, no virtualenv):
verify, preflight, install (the appliance starts), a chat completion over HTTPS with the real
model, upgrade, an upgrade to a release whose model cannot load (rolled back by itself), rollback,
status, uninstall. Prints one JSON line: every step's exit code, output and time, and what the
appliance answered between steps. Never raises for a failed step: the test judges.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

OUTPUT_TAIL = 6000
STEP_TIMEOUT_S = 600
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def no_route_out() -> bool:
    try:
        socket.create_connection(("192.0.2.1", 443), timeout=2).close()  # TEST-NET-1, never routed
    except OSError:
        return True
    return False


class Journey:
    def __init__(self, exe: Path, work: Path) -> None:
        self.exe = exe
        self.work = work
        self.root = work / "root"
        self.port = free_port()
        self.inventory = work / "inventory.yaml"
        # The node's python and appliance are the project's virtual environment: the executable
        # itself needs no python at all.
        self.inventory.write_text(
            f"gateway: {{host: 127.0.0.1, port: {self.port}}}\n"
            "service: {start_timeout_s: 240, stop_timeout_s: 30}\n"
            "firewall: {mode: render}\n"  # the test machine's own network stays as it is
            "nodes:\n"
            "  - name: local\n"
            "    connection: local\n"
            f"    python: {VENV_BIN / 'python'}\n"
            f"    appliance: {VENV_BIN / 'appliance'}\n"
            "    labels: {region: eu-test, site: lab, classification: internal}\n")
        home = work / "home"
        home.mkdir(exist_ok=True)
        self.env = {"PATH": "/usr/bin:/bin", "HOME": str(home)}
        self.steps: list[dict[str, Any]] = []

    def run(self, name: str, *args: str | Path) -> dict[str, Any]:
        argv = [str(self.exe), *(str(a) for a in args)]
        started = time.monotonic()
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, env=self.env, cwd=self.work,
                                  timeout=STEP_TIMEOUT_S)
            rc, out, err = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc, out, err = 124, str(exc.stdout or ""), f"timed out after {STEP_TIMEOUT_S} s"
        seconds = round(time.monotonic() - started, 1)
        step: dict[str, Any] = {"name": name, "argv": argv[1:], "rc": rc, "seconds": seconds,
                                "stdout": out[-OUTPUT_TAIL:], "stderr": err[-OUTPUT_TAIL:]}
        if "--json" in args:
            try:
                step["json"] = json.loads(out)
            except ValueError:
                step["json"] = None
        self.steps.append(step)
        return step

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def client(self) -> httpx.Client:
        import ssl

        return httpx.Client(base_url=self.url, timeout=120,
                            verify=ssl.create_default_context(cafile=str(self.root / "tls" / "ca.pem")))

    def health(self) -> dict[str, Any] | str:
        try:
            with self.client() as client:
                return dict(client.get("/health").json())
        except (httpx.HTTPError, OSError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"

    def chat(self) -> str:
        import openai

        token = (self.root / "secrets" / "admin.key").read_text().strip()
        with self.client() as admin:
            headers = {"Authorization": f"Bearer {token}"}
            tenant = {"name": "journey", "models": ["SmolLM2-135M-Instruct"]}
            admin.post("/admin/v1/tenants", json=tenant, headers=headers).raise_for_status()
            key = admin.post("/admin/v1/tenants/journey/keys", json={}, headers=headers).json()["key"]
        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, http_client=self.client())
        reply = client.chat.completions.create(
            model="SmolLM2-135M-Instruct", max_tokens=24, temperature=0,
            messages=[{"role": "user", "content": "What is the capital of France?"}])
        return str(reply.choices[0].message.content)

    def kill_leftovers(self) -> None:
        """Stop an appliance a failed step left running (test hygiene, not part of the journey)."""
        pidfile = self.root / "run" / "appliance.pid"
        try:
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def main(exe: str, v1: str, v2: str, broken: str, trusted_root: str, workdir: str) -> int:
    journey = Journey(Path(exe), Path(workdir))
    seen: dict[str, Any] = {"interfaces": sorted(name for _i, name in socket.if_nameindex()),
                            "no_route_out": no_route_out(), "port": journey.port}
    root, inv = journey.root, journey.inventory
    common = ("--trusted-root", trusted_root, "--root", root, "-i", inv)
    try:
        journey.run("verify", "verify", "--bundle", v1, "--trusted-root", trusted_root, "--json")
        journey.run("preflight", "preflight", "--root", root, "-i", inv, "--bundle", v1, "--allow-cpu", "--json")
        if journey.run("install", "install", "--bundle", v1, *common, "--allow-cpu", "--json")["rc"] == 0:
            seen["health_after_install"] = journey.health()
            try:
                seen["answer"] = journey.chat()
            except Exception as exc:  # the test reports it
                seen["answer"] = f"{type(exc).__name__}: {exc}"
        journey.run("upgrade", "upgrade", "--bundle", v2, *common, "--allow-cpu", "--json")
        seen["health_after_upgrade"] = journey.health()
        journey.run("upgrade_broken", "upgrade", "--bundle", broken, *common, "--allow-cpu", "--json")
        seen["health_after_broken_upgrade"] = journey.health()
        journey.run("rollback", "rollback", "--root", root, "-i", inv, "--json")
        seen["health_after_rollback"] = journey.health()
        journey.run("status", "status", "--root", root, "--json")
        journey.run("status_table", "status", "--root", root)
        journey.run("uninstall", "uninstall", "--root", root, "-i", inv, "--json")
        seen["health_after_uninstall"] = journey.health()
        seen["left_in_root"] = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        audit = subprocess.run([str(VENV_BIN / "appliance"), "audit", "verify", "--db",
                                f"sqlite:///{root / 'data' / 'appliance.db'}", "--key",
                                str(root / "secrets" / "audit-signing.key")], capture_output=True, text=True)
        seen["audit_verify"] = {"rc": audit.returncode, "output": (audit.stdout + audit.stderr)[-2000:]}
    finally:
        journey.kill_leftovers()
    print(json.dumps({"steps": journey.steps, **seen}))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:7]))
