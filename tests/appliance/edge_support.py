"""A real gateway for the edge tests: ``appliance.server.build_server`` (uvicorn, TLS, the deadline
protocol, the edge middleware) in its own process over an install root laid out as the installer
leaves it, with the real model and the edge limits a test chooses.

The server process creates the tenants and keys the tests use before it serves, and writes them
to ROOT/edge-keys.json (the tests then drive it only over HTTPS, as a client would).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml

from tests.appliance.support import free_port, interrupt, tls_ctx

MODEL = "SmolLM2-135M-Instruct"
TENANTS = ("edge-victim", "edge-attacker", "edge-fuzz")
REPO = Path(__file__).resolve().parents[2]


def lay_out_root(root: Path, model_dir: Path) -> Path:
    from policies import default_policy_dir

    release = root / "releases" / "1.0.0"
    policies = release / "policies"
    shutil.copytree(default_policy_dir(), policies)
    generous = {"allowed_models": [MODEL], "rate_limit_rpm": 100_000, "max_tokens_per_minute": 100_000_000}
    tenants = {**dict.fromkeys(TENANTS, generous), "edge-fuzz": {**generous, "max_tokens_per_request": 8}}
    (policies / "site.yaml").write_text(yaml.safe_dump({"tenants": tenants}))
    (release / "appliance.yaml").write_text(yaml.safe_dump({
        "version": "1.0.0", "bundle_digest": "sha256:test",
        "model": {"name": MODEL, "path": str(model_dir)}, "policies_dir": str(policies),
        "node": {"name": "node-a", "labels": {"region": "eu-test", "site": "lab", "classification": "internal"}},
        "gateway": {"host": "127.0.0.1", "port": 8443},
    }))
    (root / "current").symlink_to(release)
    return root


def _issue_keys(runtime: Any) -> dict[str, str]:
    """Tenant keys (and an admin key) through whichever identity API this tree has."""
    keys: dict[str, str] = {}
    for tenant in TENANTS:
        try:
            runtime.tenants.create_tenant(tenant, models=[MODEL])
        except TypeError:  # a store without per-tenant model grants
            runtime.tenants.create_tenant(tenant)
        try:  # the fuzzed tenant may also read its audit records, so that route is reached too
            scopes = ("inference", "audit:read") if tenant == "edge-fuzz" else ("inference",)
            keys[tenant] = runtime.tenants.issue_key(tenant, "edge tests", scopes=scopes).secret
        except TypeError:  # a store without key scopes
            keys[tenant] = runtime.tenants.issue_key(tenant, "edge tests").secret
    if hasattr(runtime, "admin_token"):
        keys["admin"] = runtime.admin_token
    else:
        keys["admin"] = runtime.tenants.admins.create_admin("edge-admin", "edge tests").secret
    return keys


def serve(root: Path, port: int, limits: dict[str, Any]) -> None:
    """The server process: ``python -c 'from tests.appliance.edge_support import serve; ...'``."""
    from appliance.gateway.edge import EdgeLimits
    from appliance.runtime import Runtime
    from appliance.server import build_server

    runtime = Runtime.open(root)
    keys = _issue_keys(runtime)
    tmp = root / "edge-keys.json.tmp"
    tmp.write_text(json.dumps(keys))
    tmp.replace(root / "edge-keys.json")
    build_server(runtime, "127.0.0.1", port, EdgeLimits.from_mapping(limits)).run()


@dataclass
class EdgeServer:
    root: Path
    port: int
    proc: subprocess.Popen[str]
    keys: dict[str, str]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        return self.root / "tls" / "ca.pem"

    def ssl(self) -> ssl.SSLContext:
        return tls_ctx(self.ca)

    def http(self, source: str = "127.0.0.1", **kwargs: Any) -> httpx.Client:
        """A client whose connections come from ``source`` (any 127.x.y.z: each test its own
        client address, so one test's refusals never spend another's refusal budget)."""
        transport = httpx.HTTPTransport(verify=self.ssl(), local_address=source)
        return httpx.Client(base_url=self.url, transport=transport, timeout=kwargs.pop("timeout", 60), **kwargs)

    def openai(self, tenant: str, source: str = "127.0.0.1") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.keys[tenant], max_retries=0,
                             http_client=self.http(source, timeout=120))

    def auth(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}"}

    def rss_kib(self) -> int:
        """Resident memory of the server process (kB), from /proc."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS for the server process")


@contextlib.contextmanager
def edge_server(root: Path, model_dir: Path, limits: dict[str, Any]) -> Iterator[EdgeServer]:
    lay_out_root(root, model_dir)
    port = free_port()
    code = (f"from pathlib import Path; from tests.appliance.edge_support import serve; "
            f"serve(Path({str(root)!r}), {port}, {limits!r})")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, "LC_ALL": "C.UTF-8"})
    try:
        server = EdgeServer(root, port, proc, {})
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                out = proc.stdout.read() if proc.stdout else ""
                raise AssertionError(f"gateway exited with {proc.returncode}:\n{out}")
            if (root / "edge-keys.json").exists() and server.ca.exists():
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{server.url}/health", verify=server.ssl(), timeout=2).status_code == 200:
                        break
            if time.monotonic() > deadline:
                raise AssertionError("gateway not healthy within 300 s")
            time.sleep(0.3)
        server.keys = json.loads((root / "edge-keys.json").read_text())
        yield server
    finally:
        if proc.poll() is None:
            code_, out = interrupt(proc)
            assert code_ == 0, out
