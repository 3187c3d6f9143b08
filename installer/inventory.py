"""The installer inventory: which nodes to provision and their placement labels.

YAML format::

    gateway: {host: 127.0.0.1, port: 8443}      # optional; these are the defaults
    service:                                    # optional; these are the defaults
      mode: auto                                # auto | systemd | supervisor (auto: systemd if PID 1)
      start_timeout_s: 300                      # wait this long for HTTPS /health after a start
      stop_timeout_s: 30                        # SIGTERM, then SIGKILL after this long
    database:                                   # optional; one PostgreSQL for every gateway node (required
      url: postgresql+psycopg://sovereign@db.example:5432/sovereign   # with more than one gateway node);
      ca: /etc/sovereign/db-ca.pem              # ca, client_cert/client_key, password_file: see
      password_file: /etc/sovereign/db.pw       # installer/database.py (without it: SQLite per gateway)
    audit: {publish_dir: /srv/checkpoints}      # optional; written into appliance.yaml's audit: as given
    firewall:                                   # optional; egress firewall of every node
      mode: auto                                # auto | enforce | render (auto: enforce if nft and root)
      allow_egress:                             # besides loopback, replies and the other nodes
        - {cidr: 10.0.0.0/24, ports: [123], protocol: udp}   # ports optional (all); protocol tcp|udp|any
    nodes:
      - name: local                             # [A-Za-z0-9][A-Za-z0-9._-]*
        connection: local                       # local | ssh
        python: /usr/bin/python3                # optional; the node's python3 for ansible modules
        appliance: /opt/venv/bin/appliance      # optional; default: `appliance` next to python
        gpus: 1                                 # optional; expected NVIDIA GPU count
        labels: {region: eu-west, site: dc1, classification: confidential}   # all three required
        roles: [gateway, engine]                # optional; default both (see "Several nodes" below)
        gateway_workers: 2                      # optional, gateway role only; gateway processes (default 1)
      - name: gpu-2
        connection: ssh
        host: 10.0.0.12                          # required for ssh
        user: deploy                             # optional
        port: 22                                 # optional
        ssh_key: /home/admin/.ssh/id_ed25519     # optional; private key on this machine (else ssh's default)
        known_hosts: /home/admin/fleet_known_hosts   # optional; host keys checked against this file
        roles: [engine]                          # an engine node: `appliance node serve`, mutual TLS
        engine_port: 9443                        # optional; where its engine node server listens
        models: [SmolLM2-135M-Instruct]          # optional; the one model its engine serves, a name the
                                                 # bundle carries (default: the bundle's first model)
        root: /srv/sovereign                     # optional; this node's install root (default --root)

Several nodes: the inventory needs at least one node with the gateway role and one with the
engine role. With more than one node, or any node without both roles, the install is a fleet:
every engine node runs its engine node server (mutual TLS with the installer-issued engine
certificates) and every gateway node routes to all engine nodes, each reached at
``https://<host or name>:<engine_port>`` (a name its certificates cover, see pki.node_sans).
One node with both roles is the single-node appliance: the gateway runs its engine in-process.
More than one node with the gateway role needs ``database:``: each gateway would otherwise keep
its own SQLite file, and tenants, keys and limits would not be shared.
Which model each engine node gets from a bundle carrying several: installer/node_models.py.

Without a file the inventory is one local node named ``local`` labelled region=local,
site=local, classification=internal, an evaluation on this machine: its egress firewall is
rendered, never enforced (firewall.mode render), so trying the installer cannot cut the
machine's own network.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import shutil
import sys
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from installer.database import AuditSettings, DatabaseSettings
from installer.errors import InventoryError

REQUIRED_LABELS = ("region", "site", "classification")
DEFAULT_LABELS = {"region": "local", "site": "local", "classification": "internal"}
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
ROLES = ("gateway", "engine")
DEFAULT_ENGINE_PORT = 9443
MAX_GATEWAY_WORKERS = 64

Label = Annotated[StrictStr, Field(min_length=1, max_length=128)]
Role = Literal["gateway", "engine"]
ModelName = Annotated[StrictStr, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")]


class GatewaySettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: Annotated[StrictStr, Field(min_length=1)] = "127.0.0.1"
    port: Annotated[StrictInt, Field(ge=1, le=65535)] = 8443


class ServiceSettings(BaseModel):
    """How the appliance runs on the nodes (see installer/service.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["auto", "systemd", "supervisor"] = "auto"
    start_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 300.0
    stop_timeout_s: Annotated[float, Field(gt=0, le=600)] = 30.0


Port = Annotated[StrictInt, Field(ge=1, le=65535)]


class EgressRule(BaseModel):
    """One destination the egress firewall lets the nodes reach (e.g. an NTP or DNS server)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cidr: Annotated[StrictStr, Field(min_length=1)]
    ports: list[Port] = []
    protocol: Literal["tcp", "udp", "any"] = "any"

    @field_validator("cidr")
    @classmethod
    def _network(cls, cidr: str) -> str:
        try:
            net = ipaddress.ip_network(cidr, strict=True)
        except ValueError as exc:
            raise ValueError(f"an IPv4 or IPv6 network like 10.0.0.0/24 or 10.0.0.53 (host bits zero), "
                             f"found {cidr!r} ({exc})") from None
        if net.prefixlen == 0:
            raise ValueError(f"a network narrower than {net} (allowing every address defeats the egress "
                             f"firewall; use firewall.mode: render to leave egress open), found {cidr!r}")
        return str(net)

    @field_validator("ports")
    @classmethod
    def _unique(cls, ports: list[int]) -> list[int]:
        dupes = sorted({p for p in ports if ports.count(p) > 1})
        if dupes:
            raise ValueError(f"each port once, found {dupes} more than once")
        return sorted(ports)


class FirewallSettings(BaseModel):
    """The nodes' egress firewall (nftables table inet sovereign_egress; see installer/firewall.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["auto", "enforce", "render"] = "auto"
    allow_egress: list[EgressRule] = []


class InventoryNode(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[StrictStr, Field(pattern=_NAME)]
    connection: Literal["local", "ssh"] = "local"
    host: StrictStr | None = None
    user: StrictStr | None = None
    port: Annotated[StrictInt, Field(ge=1, le=65535)] = 22
    python: StrictStr | None = None
    appliance: StrictStr | None = None
    gpus: Annotated[StrictInt, Field(ge=0)] | None = None
    labels: dict[Label, Label]
    roles: list[Role] = ["gateway", "engine"]
    engine_port: Annotated[StrictInt, Field(ge=1, le=65535)] = DEFAULT_ENGINE_PORT
    models: list[ModelName] | None = None
    root: StrictStr | None = None
    ssh_key: StrictStr | None = None
    known_hosts: StrictStr | None = None
    gateway_workers: Annotated[StrictInt, Field(ge=1, le=MAX_GATEWAY_WORKERS)] | None = None

    @field_validator("roles")
    @classmethod
    def _roles(cls, roles: list[str]) -> list[str]:
        if not roles:
            raise ValueError(f"at least one role of {list(ROLES)}, found none")
        dupes = sorted({r for r in roles if roles.count(r) > 1})
        if dupes:
            raise ValueError(f"each role once, found {dupes} more than once")
        return [r for r in ROLES if r in roles]  # a stable order: gateway, engine

    @field_validator("models")
    @classmethod
    def _models(cls, models: list[str] | None) -> list[str] | None:
        if models is not None:
            if not models:
                raise ValueError("at least one model name (or no models field: the release's model), found []")
            dupes = sorted({m for m in models if models.count(m) > 1})
            if dupes:
                raise ValueError(f"each model once, found {dupes} more than once")
        return models

    @field_validator("labels")
    @classmethod
    def _required_labels(cls, labels: dict[str, str]) -> dict[str, str]:
        missing = [k for k in REQUIRED_LABELS if k not in labels]
        if missing:
            raise ValueError(f"labels {list(REQUIRED_LABELS)}, found no {', '.join(missing)}")
        return labels

    @model_validator(mode="after")
    def _check(self) -> InventoryNode:
        if self.connection == "ssh" and not self.host:
            raise ValueError("a host for connection ssh, found none")
        if self.connection == "local" and self.host:
            raise ValueError(f"no host for connection local, found host {self.host!r}")
        if self.python is not None and not self.python.startswith("/"):
            raise ValueError(f"an absolute python path, found {self.python!r}")
        if self.appliance is not None and not self.appliance.startswith("/"):
            raise ValueError(f"an absolute path of the appliance script, found {self.appliance!r}")
        if self.root is not None and (not self.root.startswith("/") or self.root.rstrip("/") == ""
                                      or ".." in PurePosixPath(self.root).parts):
            raise ValueError(f"an absolute install root other than / without '..', found {self.root!r}")
        for field_name in ("ssh_key", "known_hosts"):
            value = getattr(self, field_name)
            if value is not None and self.connection != "ssh":
                raise ValueError(f"{field_name} only for connection ssh, found {field_name} on a "
                                 f"{self.connection} node")
            if value is not None and not value.startswith("/"):
                raise ValueError(f"an absolute {field_name} path on this machine, found {value!r}")
        if self.gateway_workers is not None and "gateway" not in self.roles:
            raise ValueError(f"gateway_workers only on a node with the gateway role, found gateway_workers "
                             f"{self.gateway_workers} on a node with roles {self.roles}")
        if self.models is not None and "engine" not in self.roles:
            raise ValueError(f"models only on a node with the engine role, found models {self.models} on a node "
                             f"with roles {self.roles}")
        return self

    @property
    def is_gateway(self) -> bool:
        return "gateway" in self.roles

    @property
    def workers(self) -> int:
        """Gateway processes on this node (``gateway: {workers: N}`` in its appliance.yaml)."""
        return self.gateway_workers or 1

    @property
    def is_engine(self) -> bool:
        return "engine" in self.roles

    def address(self) -> str:
        """How the other nodes reach this one: its SSH host, else its name (for a local node)."""
        return self.host or self.name

    def engine_url(self) -> str:
        host = self.address()
        netloc = f"[{host}]" if ":" in host else host
        return f"https://{netloc}:{self.engine_port}"

    def interpreter(self) -> str:
        """The python3 ansible runs modules with on this node (always named explicitly)."""
        if self.python:
            return self.python
        if self.connection == "local":
            if not getattr(sys, "frozen", False):
                return sys.executable
            return shutil.which("python3") or "/usr/bin/python3"
        return "/usr/bin/python3"

    def appliance_command(self) -> str:
        """The node's ``appliance`` console script: the inventory's, else the one installed next
        to the node's python (a virtual environment's bin/ holds both). Not resolved through
        symlinks: a venv's python is a link to the base interpreter, its scripts are not."""
        if self.appliance:
            return self.appliance
        return str(PurePosixPath(self.interpreter()).parent / "appliance")


class Inventory(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    nodes: Annotated[list[InventoryNode], Field(min_length=1)]
    gateway: GatewaySettings = GatewaySettings()
    service: ServiceSettings = ServiceSettings()
    firewall: FirewallSettings = FirewallSettings()
    database: DatabaseSettings | None = None
    audit: AuditSettings | None = None
    source: str = "<default>"

    @model_validator(mode="after")
    def _check(self) -> Inventory:
        names = [n.name for n in self.nodes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"unique node names, found {dupes} more than once")
        local = [n.name for n in self.nodes if n.connection == "local"]
        if len(local) > 1:
            raise ValueError(f"at most one node with connection local, found {local}")
        for role in ROLES:
            if not any(role in n.roles for n in self.nodes):
                found = ", ".join(f"{n.name}: {n.roles}" for n in self.nodes)
                raise ValueError(f"at least one node with the {role} role, found roles {found}")
        places: dict[tuple[str, str], str] = {}
        for node in self.nodes:
            if node.root is None:
                continue
            place = (node.host or "<local>", node.root.rstrip("/"))
            if place in places:
                raise ValueError(f"each node its own install root, found {node.name} and {places[place]} both "
                                 f"at {place[1]} on {place[0]}")
            places[place] = node.name
        gateways = [n.name for n in self.nodes if n.is_gateway]
        if len(gateways) > 1 and self.database is None:
            raise ValueError(f"database: (a PostgreSQL URL shared by the gateway nodes) with more than one gateway "
                             f"node: each would keep its own SQLite file and tenants, keys and limits would not be "
                             f"shared, found no database for gateway nodes {gateways}")
        return self

    @property
    def is_fleet(self) -> bool:
        """More than one node, or a node without both roles: the gateways route to engine node
        servers over mutual TLS instead of running the engine in-process."""
        return len(self.nodes) > 1 or any(len(n.roles) < len(ROLES) for n in self.nodes)

    @property
    def gateway_nodes(self) -> list[InventoryNode]:
        return [n for n in self.nodes if n.is_gateway]

    @property
    def engine_nodes(self) -> list[InventoryNode]:
        return [n for n in self.nodes if n.is_engine]

    def node_root(self, node: InventoryNode, root: Path | str) -> str:
        """The install root on ``node``: its own ``root`` field, else the installer's --root."""
        return node.root.rstrip("/") if node.root else os.fspath(root)

    def installs_into(self, root: Path | str) -> bool:
        """Whether a node of this inventory installs into ``root`` on the installer's own machine
        (a local node at that root); otherwise that root holds only the installer's state."""
        here = os.path.abspath(root)
        return any(n.connection == "local" and os.path.abspath(self.node_root(n, root)) == here for n in self.nodes)

    def fleet_nodes(self, model_name: str) -> list[dict[str, Any]]:
        """The engine nodes as appliance.yaml's fleet.nodes lists them (empty: not a fleet)."""
        if not self.is_fleet:
            return []
        return [{"name": n.name, "url": n.engine_url(), "labels": dict(n.labels),
                 "models": list(n.models or [model_name])} for n in self.engine_nodes]

    @property
    def names(self) -> list[str]:
        return [n.name for n in self.nodes]

    def local_node(self) -> InventoryNode | None:
        return next((n for n in self.nodes if n.connection == "local"), None)

    def to_ansible(self, local_tmp: Path, root: Path | str | None = None) -> dict[str, Any]:
        """An ansible YAML/JSON inventory: group ``sovereign_nodes`` with per-host connection vars,
        roles, models, engine port and, given ``root``, the node's install root (``sovereign_root``
        as a host var: the installer then never passes it as an extra var, which would override it)."""
        hosts: dict[str, dict[str, Any]] = {}
        for node in self.nodes:
            hostvars: dict[str, Any] = {
                "ansible_connection": node.connection,
                "ansible_python_interpreter": node.interpreter(),
                "sovereign_node_labels": dict(node.labels),
                "sovereign_node_roles": list(node.roles),
                "sovereign_node_models": list(node.models or []),
                "sovereign_node_engine_port": node.engine_port,
                "sovereign_service_exe": node.appliance_command(),
                "sovereign_node_gateway_workers": node.workers,
            }
            if root is not None:
                hostvars["sovereign_root"] = self.node_root(node, root)
            if node.gpus is not None:
                hostvars["sovereign_node_gpus"] = node.gpus
            if node.connection == "local":
                hostvars["ansible_remote_tmp"] = str(local_tmp)
            else:
                hostvars["ansible_host"] = node.host
                hostvars["ansible_port"] = node.port
                if node.user:
                    hostvars["ansible_user"] = node.user
                if node.ssh_key:
                    hostvars["ansible_ssh_private_key_file"] = node.ssh_key
                if node.known_hosts:  # host keys are checked, never switched off
                    hostvars["ansible_ssh_common_args"] = (f"-o UserKnownHostsFile={shlex.quote(node.known_hosts)} "
                                                           "-o StrictHostKeyChecking=yes")
            hosts[node.name] = hostvars
        return {"sovereign_nodes": {"hosts": hosts}}


def default_inventory() -> Inventory:
    return Inventory(nodes=[InventoryNode(name="local", connection="local", labels=dict(DEFAULT_LABELS))],
                     firewall=FirewallSettings(mode="render"))


def _describe(error: ValidationError, source: str) -> str:
    lines = []
    for err in error.errors():
        parts = []
        for part in err["loc"]:
            if isinstance(part, int):
                parts.append(f"[{part}]")
            else:
                parts.append(("." if parts else "") + str(part))
        where = "".join(parts) or "<top level>"
        kind = err["type"]
        found = repr(err.get("input"))
        found = found if len(found) <= 80 else found[:77] + "..."
        if kind == "missing":
            expected, found = "a value (required field)", "nothing"
        elif kind == "extra_forbidden":
            expected, found = "only known fields", f"unknown field {err['loc'][-1]!r}"
        elif kind == "too_short":
            ctx = err.get("ctx", {})
            expected, found = f"at least {ctx.get('min_length')} item(s)", f"{ctx.get('actual_length')}"
        elif kind == "value_error":
            expected, _, found = str(err["msg"]).removeprefix("Value error, ").partition(", found ")
        else:
            expected = str(err["msg"]).removeprefix("Input should be ")
        lines.append(f"{source}: {where}: expected {expected}, found {found}")
    return "invalid inventory:\n  " + "\n  ".join(lines)


def load_inventory(path: Path | str | None = None) -> Inventory:
    """Read and validate an inventory file; ``None`` gives the default single local node."""
    if path is None:
        return default_inventory()
    path = Path(path)
    if not path.is_file():
        raise InventoryError(f"inventory: expected a YAML file, found nothing at {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise InventoryError(f"{path}: expected a readable UTF-8 file, found {exc}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "<file>"
        raise InventoryError(f"{path}: {where}: expected valid YAML, found {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(data, dict):
        raise InventoryError(f"{path}: <top level>: expected a mapping with 'nodes', found {type(data).__name__}")
    try:
        return Inventory.model_validate({**data, "source": os.fspath(path)},
                                        context={"base_dir": os.fspath(path.parent.resolve())})
    except ValidationError as exc:
        raise InventoryError(_describe(exc, os.fspath(path))) from exc
