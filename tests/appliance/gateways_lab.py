"""Several gateway processes on one database, routing to stand-in engine nodes (tests only).

Built on ``FleetLab`` (the installer's PKI, each root laid out as the installer lays it out):
gateway ``i`` has its own install root (``gw`` for the first, ``gw<i>`` for the others), its own
port and the same ``database.url``; the others get the first one's secrets (audit signing key,
cache salt, content key) and TLS material, as an installer gives every gateway host of one
appliance. Nodes are ``tests/appliance/standin_node.py`` processes (real node server, mutual
TLS, real tokenizer, no model: see that module), so streams last as long as a test needs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import ssl
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import yaml

from tests.appliance.fleet_lab import MODEL, NODE_ENV, FleetLab, stop_processes
from tests.appliance.support import BIN, free_port, tls_ctx

NODE_LABELS = {"region": "eu", "site": "a", "classification": "internal"}


def policy(tenants: Mapping[str, Mapping[str, object]]) -> dict[str, object]:
    """A site policy: every tenant may use every model on any node (the shipped rule ``anywhere``)."""
    return {"tenants": {name: {"allowed_models": ["*"], "residency": "anywhere", **limits}
                        for name, limits in tenants.items()}}


@dataclass
class Gateway:
    root: Path
    port: int
    proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


@dataclass
class GatewaysLab:
    base: Path
    model_dir: Path
    db_url: str
    fleet: FleetLab = field(init=False)
    gateways: list[Gateway] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.fleet = FleetLab(self.base, self.model_dir)

    def build(self, tenants: Mapping[str, Mapping[str, object]], *, gateways: int = 2, workers: int = 1) -> None:
        self.fleet.build({"n1": NODE_LABELS}, policy(tenants),
                         {"health_interval_s": 0.5, "health_backoff_max_s": 2.0, "connect_timeout_s": 3.0,
                          "read_timeout_s": 15.0})
        first = self.fleet.gateway_root
        config_path = first / "current" / "appliance.yaml"
        doc = yaml.safe_load(config_path.read_text())
        doc["database"] = {"url": self.db_url}
        doc["gateway"]["workers"] = workers
        config_path.write_text(yaml.safe_dump(doc))
        self.gateways = [Gateway(first, self.fleet.gateway_port)]
        for i in range(1, gateways):
            root = self.base / f"gw{i + 1}"
            release = root / "releases" / "1.0.0"
            release.mkdir(parents=True)
            port = free_port()
            own = {**doc, "gateway": {**doc["gateway"], "port": port}}
            (release / "appliance.yaml").write_text(yaml.safe_dump(own))
            (root / "current").symlink_to(release)
            self.gateways.append(Gateway(root, port))

    # ---- processes ----------------------------------------------------------------------
    def start_node(self, tokens: int = 16, delay_ms: float = 0.0) -> None:
        self.fleet.start_standin("n1", tokens=tokens, delay_ms=delay_ms)

    def start_gateway(self, i: int, *extra: str) -> Gateway:
        gw = self.gateways[i]
        if i > 0:  # the first gateway's secrets and TLS material, as the installer gives every gateway host
            first = self.gateways[0].root
            if not (gw.root / "secrets").exists():
                shutil.copytree(first / "secrets", gw.root / "secrets")
            shutil.copytree(first / "tls", gw.root / "tls", dirs_exist_ok=True)
        log = (gw.root / "gateway.log").open("a")
        gw.proc = subprocess.Popen([str(BIN / "appliance"), "serve", "--root", str(gw.root), "--port", str(gw.port),
                                    *extra], text=True, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, **NODE_ENV}, start_new_session=True)
        self.wait_gateway(i)
        return gw

    def wait_gateway(self, i: int, timeout_s: float = 120) -> None:
        gw = self.gateways[i]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert gw.proc is not None
            if gw.proc.poll() is not None:
                raise AssertionError(f"gateway {i} exited {gw.proc.returncode}:\n{self.log(i)}")
            with contextlib.suppress(httpx.HTTPError, FileNotFoundError):  # the CA is made by the first start
                if httpx.get(f"{gw.url}/health", verify=self.tls(), timeout=2).status_code == 200:
                    return
            time.sleep(0.3)
        raise AssertionError(f"gateway {i} not healthy within {timeout_s} s:\n{self.log(i)}")

    def log(self, i: int) -> str:
        path = self.gateways[i].root / "gateway.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def tls(self) -> ssl.SSLContext:
        return tls_ctx(self.gateways[0].root / "tls" / "ca.pem")

    def client(self, i: int, key: str, timeout: float = 60) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.gateways[i].url}/v1", api_key=key, max_retries=0,
                             http_client=httpx.Client(verify=self.tls(), timeout=timeout))  # type: ignore[arg-type]

    def admin(self, i: int, admin_key: str) -> httpx.Client:
        return httpx.Client(base_url=self.gateways[i].url, verify=self.tls(),
                            headers={"Authorization": f"Bearer {admin_key}"}, timeout=30)

    def appliance(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "appliance"), *args], text=True, capture_output=True,
                              env={**os.environ, **NODE_ENV}, timeout=180)

    def close(self) -> None:
        stop_processes([g.proc for g in self.gateways] + [n.proc for n in self.fleet.nodes.values()], timeout_s=60)


def admin_key(db_url: str) -> str:
    """A new admin's key, made in the shared database as `appliance admins create` would."""
    from appliance.db import open_database
    from appliance.tenancy import TenantStore

    engine = open_database(db_url)
    try:
        return TenantStore(engine).admins.create_admin("ops", "test").secret
    finally:
        engine.dispose()


def ask(client: openai.OpenAI, max_tokens: int = 4) -> str:
    reply = client.chat.completions.create(model=MODEL, max_tokens=max_tokens,
                                           messages=[{"role": "user", "content": "Say hello."}])
    return str(reply.id)
