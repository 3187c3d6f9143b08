"""``appliance node serve`` (this host's engine node server) and ``appliance nodes ...`` (the
gateway's node registry: list, add, remove, drain, undrain).

The registry commands work on the gateway's database under ``--root``; a running gateway sees
each change within one health interval. Every change is an audit event under the operator's name.
"""

from __future__ import annotations

import getpass
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from appliance.errors import ApplianceError

node_app = typer.Typer(help="This host's engine node server.", no_args_is_help=True)
nodes_app = typer.Typer(help="The engine nodes the gateway routes to.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)

RootOpt = Annotated[Path, typer.Option("--root", help="Install root of the appliance (the gateway's, for nodes).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")]


def _fail(exc: Exception, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
    return typer.Exit(code)


@node_app.command("serve")
def node_serve(root: RootOpt = Path("var"), host: str | None = None, port: int | None = None) -> None:
    """Serve this host's engine over mutual TLS for the gateway (ROOT/tls/engine/server.pem, client CA
    ROOT/tls/engine/ca.pem); listens on appliance.yaml's engine_node host and port."""
    from appliance.node_service import serve_node

    try:
        serve_node(root, host, port, console)
    except ApplianceError as exc:
        raise _fail(exc) from None


def _registry(root: Path):  # type: ignore[no-untyped-def]
    from appliance.audit import AuditLog
    from appliance.config import load_config
    from appliance.db import open_database
    from appliance.nodes import NodeRegistry

    config = load_config(root)
    return NodeRegistry(open_database(config.db_url)), AuditLog(config.db_url, config.audit_key_path)


def _audit(audit: Any, event: str, data: dict[str, Any]) -> None:
    audit.append(f"admin.{event}", stream="_admin", actor=f"cli:{getpass.getuser()}", data=data)


def _labels(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise typer.BadParameter(f"expected KEY=VALUE, found {pair!r}", param_hint="--label")
        out[key] = value
    return out


@nodes_app.command("list")
def nodes_list(root: RootOpt = Path("var"), as_json: JsonOpt = False) -> None:
    """The registered nodes: URL, labels, models, state and last health."""
    try:
        registry, _ = _registry(root)
    except ApplianceError as exc:
        raise _fail(exc) from None
    nodes = registry.all()
    if as_json:
        print(json.dumps([n.public() for n in nodes]))
        return
    table = Table("node", "state", "health", "url", "labels", "models", "source")
    for n in nodes:
        labels = ", ".join(f"{k}={v}" for k, v in sorted(n.labels.items()))
        table.add_row(n.name, n.display_state, n.health, n.url, labels, ", ".join(n.models), n.source)
    console.print(table)


@nodes_app.command("add")
def nodes_add(
    name: str, url: Annotated[str, typer.Option(help="https://HOST:PORT of the node's engine server.")],
    model: Annotated[list[str], typer.Option("--model", help="A model name the node serves (repeat).")],
    label: Annotated[list[str], typer.Option("--label", help="KEY=VALUE (repeat); region, site, classification.")],
    root: RootOpt = Path("var"), as_json: JsonOpt = False,
) -> None:
    """Register an engine node (its certificate must come from the installation CA)."""
    try:
        registry, audit = _registry(root)
        node = registry.add(name, url, _labels(label), model)
    except ApplianceError as exc:
        raise _fail(exc) from None
    _audit(audit, "node_added", {"node": name, "url": url, "labels": node.labels, "models": list(node.models),
                                 "source": "admin"})
    print(json.dumps(node.public())) if as_json else console.print(f"added node {name}")


@nodes_app.command("remove")
def nodes_remove(name: str, root: RootOpt = Path("var")) -> None:
    """Remove a node from the registry (drain it first to lose no request)."""
    try:
        registry, audit = _registry(root)
        registry.remove(name)
    except ApplianceError as exc:
        raise _fail(exc) from None
    _audit(audit, "node_removed", {"node": name})
    console.print(f"removed node {name}")


@nodes_app.command("drain")
def nodes_drain(
    name: str, root: RootOpt = Path("var"),
    wait: Annotated[float, typer.Option(help="Seconds to wait until the node is drained (0: do not wait).")] = 0.0,
    as_json: JsonOpt = False,
) -> None:
    """No new requests for the node; in-flight ones finish. Exit 0 once drained (with --wait), 3 if
    still draining when the wait ends."""
    try:
        registry, audit = _registry(root)
        node = registry.require(name)
        if node.state == "active":
            registry.set_state(name, "draining", expect=("active",))
            _audit(audit, "node_draining", {"node": name})
        deadline = time.monotonic() + wait
        node = registry.require(name)
        while node.state == "draining" and time.monotonic() < deadline:
            time.sleep(0.2)
            node = registry.require(name)
    except ApplianceError as exc:
        raise _fail(exc) from None
    if as_json:
        print(json.dumps(node.public()))
    else:
        console.print(f"node {name}: {node.display_state}")
    if wait and node.state == "draining":
        raise typer.Exit(3)


@nodes_app.command("undrain")
def nodes_undrain(name: str, root: RootOpt = Path("var")) -> None:
    """Put a draining or drained node back in service."""
    try:
        registry, audit = _registry(root)
        node = registry.require(name)
        if node.state != "active":
            registry.set_state(name, "active")
            _audit(audit, "node_undrained", {"node": name, "was": node.state})
    except ApplianceError as exc:
        raise _fail(exc) from None
    console.print(f"node {name}: active")
