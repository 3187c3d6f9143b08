"""A fleet on this machine for tests: real engine node processes behind one real gateway process.

Certificates come from the installer's own PKI code (installer.pki: the installation CA, each
node's engine-server certificate, the gateway's engine-client certificate), laid out as the
installer lays them out under each root's tls/. Every node is a separate `appliance node serve`
process with its own install root; the gateway is `appliance serve` with a ``fleet:`` section
naming the nodes. Everything listens on loopback only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import yaml

from tests.appliance.support import BIN, free_port, tls_ctx

MODEL = "SmolLM2-135M-Instruct"
NODE_ENV = {"OMP_NUM_THREADS": "1", "LC_ALL": "C.UTF-8", "HF_HUB_OFFLINE": "1"}
ENGINE = {"device": "cpu", "dtype": "float32", "kv_cache_bytes": 96 * 2**20, "max_num_seqs": 16}


@dataclass
class EngineNode:
    name: str
    labels: dict[str, str]
    root: Path
    port: int
    proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


@dataclass
class FleetLab:
    base: Path
    model_dir: Path
    nodes: dict[str, EngineNode] = field(default_factory=dict)
    gateway_root: Path = Path()
    gateway_port: int = 0
    gateway: subprocess.Popen[str] | None = None

    # ---- layout -------------------------------------------------------------------------
    def build(self, node_labels: dict[str, dict[str, str]], tenants_policy: dict[str, object],
              fleet_settings: dict[str, float] | None = None) -> None:
        from installer.inventory import Inventory, InventoryNode
        from installer.layout import RootLayout
        from installer.pki import prepare_pki

        inventory = Inventory(nodes=[
            InventoryNode(name="gw", connection="ssh", host="127.0.0.1", roles=["gateway"],
                          labels={"region": "x", "site": "x", "classification": "x"}),
            *(InventoryNode(name=name, connection="ssh", host="127.0.0.1", roles=["engine"], labels=labels)
              for name, labels in node_labels.items())])
        pki = prepare_pki(RootLayout(self.base / "controller"), inventory)
        policies = self.base / "policies"
        from policies import default_policy_dir

        shutil.copytree(default_policy_dir(), policies)
        (policies / "site.yaml").write_text(yaml.safe_dump(tenants_policy))
        for name, labels in node_labels.items():
            node = EngineNode(name, labels, self.base / name, free_port())
            self._lay_out(node.root, pki.pki_dir, name, {
                "node": {"name": name, "labels": labels, "roles": ["engine"]},
                "engine_node": {"host": "127.0.0.1", "port": node.port}, "engine": ENGINE}, policies)
            self.nodes[name] = node
        self.gateway_root = self.base / "gw"
        self.gateway_port = free_port()
        self._lay_out(self.gateway_root, pki.pki_dir, "gw", {
            "node": {"name": "gw", "labels": {"region": "x", "site": "x", "classification": "x"}, "roles": ["gateway"]},
            "gateway": {"host": "127.0.0.1", "port": self.gateway_port},
            "fleet": {"nodes": [{"name": n.name, "url": n.url, "labels": n.labels, "models": [MODEL]}
                                for n in self.nodes.values()], **(fleet_settings or {})}}, policies)

    def build_single(self, tenants_policy: dict[str, object], labels: dict[str, str] | None = None,
                     engine: dict[str, object] | None = None) -> None:
        """One host running gateway and engine in one process (the quickstart's shape: no fleet)."""
        from policies import default_policy_dir

        policies = self.base / "policies"
        shutil.copytree(default_policy_dir(), policies)
        (policies / "site.yaml").write_text(yaml.safe_dump(tenants_policy))
        self.gateway_root = self.base / "gw"
        self.gateway_port = free_port()
        release = self.gateway_root / "releases" / "1.0.0"
        release.mkdir(parents=True)
        (release / "appliance.yaml").write_text(yaml.safe_dump({
            "version": "1.0.0", "bundle_digest": "sha256:single-test",
            "model": {"name": MODEL, "path": str(self.model_dir)}, "policies_dir": str(policies),
            "node": {"name": "solo", "labels": labels or {"region": "eu", "site": "a", "classification": "internal"}},
            "gateway": {"host": "127.0.0.1", "port": self.gateway_port}, "engine": {**ENGINE, **(engine or {})}}))
        (self.gateway_root / "current").symlink_to(release)

    def _lay_out(self, root: Path, pki_dir: Path, node: str, extra: dict[str, object], policies: Path) -> None:
        release = root / "releases" / "1.0.0"
        release.mkdir(parents=True)
        (release / "appliance.yaml").write_text(yaml.safe_dump({
            "version": "1.0.0", "bundle_digest": "sha256:fleet-test",
            "model": {"name": MODEL, "path": str(self.model_dir)}, "policies_dir": str(policies), **extra}))
        (root / "current").symlink_to(release)
        engine_tls = root / "tls" / "engine"
        engine_tls.mkdir(parents=True)
        node_dir = pki_dir / "nodes" / node
        for src, dest in (("engine-server.pem", "server.pem"), ("engine-server.key", "server.key"),
                          ("engine-client.pem", "client.pem"), ("engine-client.key", "client.key")):
            shutil.copy(node_dir / src, engine_tls / dest)
            (engine_tls / dest).chmod(0o600 if dest.endswith(".key") else 0o644)
        shutil.copy(pki_dir / "ca.pem", engine_tls / "ca.pem")

    # ---- processes ----------------------------------------------------------------------
    def _spawn(self, args: list[str], log: Path) -> subprocess.Popen[str]:
        out = log.open("a")
        return subprocess.Popen([str(BIN / "appliance"), *args], text=True, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **NODE_ENV}, start_new_session=True)

    def start_node(self, name: str, wait: bool = True) -> None:
        node = self.nodes[name]
        node.proc = self._spawn(["node", "serve", "--root", str(node.root)], node.root / "node.log")
        if wait:
            self.wait_node(name)

    def start_standin(self, name: str, *, tokens: int = 16, delay_ms: float = 0.0) -> None:
        """Run node ``name`` as a stand-in engine node (tests/appliance/standin_node.py: the real node
        server and tokenizer, no model) and wait for it; ``close`` stops it."""
        node = self.nodes[name]
        log = (node.root / "node.log").open("a")
        node.proc = subprocess.Popen(  # type: ignore[assignment]
            [sys.executable, "-m", "tests.appliance.standin_node", "--root", str(node.root), "--model-dir",
             str(self.model_dir), "--port", str(node.port), "--tokens", str(tokens), "--delay-ms", str(delay_ms)],
            text=True, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **NODE_ENV}, start_new_session=True,
            cwd=Path(__file__).resolve().parents[2])
        self.wait_node(name, 120)

    def wait_node(self, name: str, timeout_s: float = 240) -> None:
        node = self.nodes[name]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert node.proc is not None
            if node.proc.poll() is not None:
                log = (node.root / "node.log").read_text()
                raise AssertionError(f"node {name} exited {node.proc.returncode}:\n{log}")
            with contextlib.suppress(httpx.HTTPError):
                if self.node_http(name).get("/health").status_code == 200:
                    return
            time.sleep(0.5)
        raise AssertionError(f"node {name} not healthy within {timeout_s} s")

    def stop_node(self, name: str, sig: int = signal.SIGTERM) -> None:
        node = self.nodes[name]
        if node.proc is not None and node.proc.poll() is None:
            os.killpg(node.proc.pid, sig)
            node.proc.wait(timeout=60)

    def node_http(self, name: str, *, client_cert: bool = True) -> httpx.Client:
        """An HTTPS client of the node's engine server: the gateway's installer-issued certificate."""
        tls = self.gateway_root / "tls" / "engine"
        ctx = ssl.create_default_context(cafile=str(tls / "ca.pem"))
        if client_cert:
            ctx.load_cert_chain(str(tls / "client.pem"), str(tls / "client.key"))
        return httpx.Client(base_url=self.nodes[name].url, verify=ctx, timeout=10)

    def node_tokens(self, name: str) -> float:
        """Prompt + generated tokens the node's own metrics count (what it really served)."""
        text = self.node_http(name).get("/metrics").text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(("vllm:prompt_tokens_total", "vllm:generation_tokens_total")):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def start_all(self) -> None:
        """Every node (started together, then waited for), then the gateway."""
        for name in self.nodes:
            self.start_node(name, wait=False)
        for name in self.nodes:
            self.wait_node(name)
        self.start_gateway()

    def start_gateway(self) -> None:
        self.gateway = self._spawn(["serve", "--root", str(self.gateway_root)], self.gateway_root / "gateway.log")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.gateway.poll() is not None:
                raise AssertionError(f"gateway exited:\n{(self.gateway_root / 'gateway.log').read_text()}")
            ca = self.gateway_root / "tls" / "ca.pem"
            if ca.exists():
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{self.url}/health", verify=tls_ctx(ca), timeout=2).status_code == 200:
                        return
            time.sleep(0.3)
        raise AssertionError("gateway not healthy")

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.gateway_port}"

    def client(self, key: str, timeout: float = 120) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0,
                             http_client=httpx.Client(  # type: ignore[arg-type]  # openai 3 types it as httpx2's
                                 verify=tls_ctx(self.gateway_root / "tls" / "ca.pem"), timeout=timeout))

    def tenant_key(self, tenant: str) -> str:
        from appliance.db import open_database
        from appliance.tenancy import TenantStore

        store = TenantStore(open_database(f"sqlite:///{self.gateway_root / 'data' / 'appliance.db'}"))
        if store.get_tenant(tenant) is None:
            store.create_tenant(tenant)
        return store.issue_key(tenant).secret

    def records(self, tenant: str) -> list[tuple[str, str | None, dict[str, object]]]:
        from appliance.audit import AuditLog

        log = AuditLog(f"sqlite:///{self.gateway_root / 'data' / 'appliance.db'}",
                       self.gateway_root / "secrets" / "audit-signing.key")
        try:
            return [(r.event_type, r.request_id, dict(r.data)) for r in log.query(tenant, None, None)]
        finally:
            log.close()

    def appliance(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "appliance"), *args, "--root", str(self.gateway_root)], text=True,
                              capture_output=True, env={**os.environ, **NODE_ENV}, timeout=120)

    def close(self) -> None:
        stop_processes([n.proc for n in self.nodes.values()] + [self.gateway], timeout_s=30)


def stop_processes(procs: list[subprocess.Popen[str] | None], *, timeout_s: float) -> None:
    """SIGTERM every live process group, wait up to ``timeout_s`` each, then SIGKILL what is left."""
    for proc in procs:
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        if proc is not None:
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
