"""A fleet installed for real: SSH hosts in network namespaces (tests/installer/sshhosts.py), one
signed bundle with the real model and the wheelhouse, one ``sovereign-installer install`` run (the
CLI in a child process) over SSH to every node. Reusable by fleet behaviour tests::

    with installed_fleet(tmp, keys, model_dir, wheelhouse, FLEET_3) as fleet:
        fleet.gateway_url            # https://10.77.K.2:8443 (the first gateway node)
        fleet.ca                     # the installation CA (trust it for the gateway and engine nodes)
        fleet.root("gpu-a1")         # that node's install root (they share this filesystem)
        fleet.engine_client          # (cert, key): the gateway's installer-issued engine client certificate
        fleet.engine_url("gpu-a1")   # https://10.77.K.3:9443
        fleet.service("gpu-a1", "engine", "stop")   # or "start"; over SSH with the node's appliancectl
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from airgap_bundle import build_bundle
from policies import default_policy_dir
from tests.installer.conftest import REPO
from tests.installer.sshhosts import SshHosts, ssh_hosts

GATEWAY_PORT = 8443
ENGINE_PORT = 9443


@dataclass(frozen=True)
class NodeSpec:
    name: str
    roles: tuple[str, ...]
    site: str
    region: str = "eu"
    classification: str = "internal"

    def labels(self) -> dict[str, str]:
        return {"region": self.region, "site": self.site, "classification": self.classification}


# one gateway node and two engine nodes, one per site
FLEET_3 = (NodeSpec("gw-1", ("gateway",), "a"), NodeSpec("gpu-a1", ("engine",), "a"),
           NodeSpec("gpu-b1", ("engine",), "b"))


def fleet_inventory(hosts: SshHosts, specs: tuple[NodeSpec, ...], start_timeout_s: float = 300) -> dict[str, Any]:
    """The inventory the fleet is installed from (written as YAML for the CLI)."""
    return {
        "gateway": {"host": "0.0.0.0", "port": GATEWAY_PORT},
        "service": {"mode": "supervisor", "start_timeout_s": start_timeout_s, "stop_timeout_s": 30},
        "firewall": {"mode": "render"},
        "nodes": [hosts.inventory_node(hosts.by_name(s.name), roles=list(s.roles), labels=s.labels(),
                                       engine_port=ENGINE_PORT) for s in specs],
    }


@dataclass
class Fleet:
    hosts: SshHosts
    specs: tuple[NodeSpec, ...]
    controller_root: Path
    inventory: Path
    bundle: Path
    trusted_root: Path
    install: dict[str, Any]
    install_s: float
    timings: dict[str, float] = field(default_factory=dict)

    def spec(self, name: str) -> NodeSpec:
        return next(s for s in self.specs if s.name == name)

    def root(self, name: str) -> Path:
        return self.hosts.by_name(name).root

    def address(self, name: str) -> str:
        return self.hosts.by_name(name).address

    @property
    def gateway(self) -> str:
        return next(s.name for s in self.specs if "gateway" in s.roles)

    @property
    def engines(self) -> list[str]:
        return [s.name for s in self.specs if "engine" in s.roles]

    @property
    def gateway_url(self) -> str:
        return f"https://{self.address(self.gateway)}:{GATEWAY_PORT}"

    def engine_url(self, name: str) -> str:
        return f"https://{self.address(name)}:{ENGINE_PORT}"

    @property
    def ca(self) -> Path:
        return self.controller_root / "state" / "pki" / "ca.pem"

    @property
    def engine_client(self) -> tuple[Path, Path]:
        tls = self.root(self.gateway) / "tls" / "engine"
        return tls / "client.pem", tls / "client.key"

    def config(self, name: str) -> dict[str, Any]:
        return dict(yaml.safe_load((self.root(name) / "current" / "appliance.yaml").read_text()))

    def ctl(self, name: str, *args: str, timeout: float = 330) -> dict[str, Any]:
        """appliancectl on the node, over SSH; its JSON report."""
        root = str(self.root(name))
        proc = self.hosts.ssh(self.hosts.by_name(name), "/usr/bin/python3", f"{root}/bin/appliancectl", *args,
                              timeout=timeout, check=False)
        try:
            return dict(json.loads(proc.stdout.splitlines()[0]))
        except (IndexError, ValueError):
            raise AssertionError(f"appliancectl {args} on {name}: rc {proc.returncode}, "
                                 f"{proc.stdout}{proc.stderr}") from None

    def appliance(self, name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """The `appliance` CLI of the release in service on the node (its runtime), over SSH,
        with --root of that node appended."""
        root = self.root(name)
        runtime = json.loads((root / "current" / "release.json").read_text())["runtime"]
        exe = root / "runtimes" / runtime / "bin" / "appliance"
        return self.hosts.ssh(self.hosts.by_name(name), str(exe), *args, "--root", str(root), timeout=timeout,
                              check=False)

    def records(self, tenant: str) -> list[tuple[str, str | None, dict[str, Any]]]:
        """(event type, request id, data) of the tenant's audit records in the gateway's database."""
        from appliance.audit import AuditLog

        root = self.root(self.gateway)
        log = AuditLog(f"sqlite:///{root / 'data' / 'appliance.db'}", root / "secrets" / "audit-signing.key")
        try:
            return [(r.event_type, r.request_id, dict(r.data)) for r in log.query(tenant, None, None)]
        finally:
            log.close()

    def status(self, name: str) -> dict[str, Any]:
        return self.ctl(name, "status", "--root", str(self.root(name)))

    def service(self, name: str, kind: str, action: str) -> dict[str, Any]:
        """Stop or start one service ("gateway" | "engine") of a node, as the supervisor does."""
        root = str(self.root(name))
        if action == "stop":
            return self.ctl(name, "stop", "--kind", kind, "--root", root)
        config = self.config(name)
        listen = config["gateway"] if kind == "gateway" else config["engine_node"]
        return self.ctl(name, "start", "--kind", kind, "--root", root, "--exe", "/usr/bin/appliance",
                        "--host", str(listen["host"]), "--port", str(listen["port"]),
                        "--expect-version", str(config["version"]), "--timeout", "300")


def fleet_bundle(work: Path, keys: Path, model_dir: Path, wheelhouse: Path, version: str = "0.1.0") -> Path:
    return build_bundle(work / f"appliance-{version}.tar", keys, version, datetime.now(UTC) + timedelta(days=30),
                        model_dir=model_dir, policies_dir=default_policy_dir(), wheelhouse=wheelhouse,
                        metadata_version=int(time.time()))


def install(fleet: Fleet, bundle: Path, action: str = "install") -> dict[str, Any]:
    """Run `sovereign-installer install|upgrade` of ``bundle`` on the fleet; its JSON result."""
    proc = run_installer(action, "--bundle", str(bundle), "--trusted-root", str(fleet.trusted_root),
                         "--root", str(fleet.controller_root), "--inventory", str(fleet.inventory), "--allow-cpu",
                         "--json")
    assert proc.returncode == 0, f"{action} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return dict(json.loads(proc.stdout))


def run_installer(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "installer.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)


@contextmanager
def installed_fleet(tmp: Path, keys: Path, model_dir: Path, wheelhouse: Path,
                    specs: tuple[NodeSpec, ...] = FLEET_3,
                    configure: Callable[[SshHosts, dict[str, Any]], None] | None = None) -> Iterator[Fleet]:
    """SSH hosts for ``specs``, the fleet installed on them in one CLI run (asserted to succeed);
    every process on the hosts is stopped and the hosts removed on exit. ``configure`` may change
    the inventory (a dict, as fleet_inventory makes it) once the hosts are up, before it is written."""
    with ssh_hosts(tmp / "ssh", [s.name for s in specs]) as hosts:
        started = time.monotonic()
        bundle = fleet_bundle(tmp, keys, model_dir, wheelhouse)
        bundle_s = time.monotonic() - started
        inventory = tmp / "inventory.yaml"
        document = fleet_inventory(hosts, specs)
        if configure is not None:
            configure(hosts, document)
        inventory.write_text(yaml.safe_dump(document, sort_keys=False))
        fleet = Fleet(hosts=hosts, specs=specs, controller_root=tmp / "controller", inventory=inventory,
                      bundle=bundle, trusted_root=keys / "root.json", install={}, install_s=0.0)
        started = time.monotonic()
        fleet.install = install(fleet, bundle)
        fleet.install_s = time.monotonic() - started
        fleet.timings = {"bundle_build_s": round(bundle_s, 1), "install_s": round(fleet.install_s, 1)}
        print(f"fleet of {len(specs)} nodes: {fleet.timings}")
        yield fleet
