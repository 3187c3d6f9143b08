"""The ``appliance`` command: quickstart, serve, tenants, keys, audit."""

from __future__ import annotations

import getpass
import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from appliance.errors import ApplianceError, ConfigError, TenancyError

app = typer.Typer(help="Sovereign inference appliance.", no_args_is_help=True, add_completion=False)
tenants_app = typer.Typer(help="Manage tenants.", no_args_is_help=True)
keys_app = typer.Typer(help="Manage tenant API keys.", no_args_is_help=True)
app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")
console = Console()
err = Console(stderr=True)

RootOpt = Annotated[Path, typer.Option("--root", help="Install root of the appliance.")]


def _fail(exc: Exception, code: int = 1) -> typer.Exit:
    err.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
    return typer.Exit(code)


@app.command()
def quickstart(
    root: RootOpt = Path("var"),
    model_dir: Annotated[Path, typer.Option(help="Hugging Face-style model directory (imported if absent).")] = Path(
        ".cache/models/SmolLM2-135M-Instruct"),
    host: str = "127.0.0.1",
    port: int = 8443,
    wheelhouse: Annotated[Path | None, typer.Option(
        help="Wheels of the appliance and its dependencies (`make wheelhouse`): the bundle carries them and the "
             "appliance is served by the runtime the installer builds from them with pip --no-index.")] = None,
) -> None:
    """Build a signed bundle, install it offline, and serve it over HTTPS with a demo tenant."""
    from appliance.quickstart import quickstart as run

    logging.basicConfig(level=logging.WARNING)
    try:
        run(root, model_dir, host, port, console, wheelhouse)
    except ApplianceError as exc:
        raise _fail(exc) from None
    except Exception as exc:  # errors of the other packages carry their own clear messages
        if type(exc).__module__.split(".")[0] in {"airgap_bundle", "policies", "engine"}:
            raise _fail(exc) from None
        raise


@app.command()
def serve(root: RootOpt = Path("var"), host: str | None = None, port: int | None = None) -> None:
    """Serve an installed appliance (ROOT/current) over HTTPS."""
    from appliance.runtime import Runtime
    from appliance.server import build_server

    logging.basicConfig(level=logging.WARNING)
    try:
        runtime = Runtime.open(root)
        server = build_server(runtime, host or runtime.config.host, port or runtime.config.port)
    except ApplianceError as exc:
        raise _fail(exc) from None
    console.print(f"serving on https://{host or runtime.config.host}:{port or runtime.config.port}")
    server.run()


def _store(root: Path):  # type: ignore[no-untyped-def]
    from appliance.audit import AuditLog
    from appliance.config import load_config
    from appliance.db import open_database
    from appliance.tenancy import TenantStore

    config = load_config(root)
    return TenantStore(open_database(config.db_url)), AuditLog(config.db_url, config.audit_key_path)


@tenants_app.command("create")
def tenants_create(name: str, root: RootOpt = Path("var")) -> None:
    try:
        store, audit = _store(root)
        tenant = store.create_tenant(name)
    except (TenancyError, ConfigError) as exc:
        raise _fail(exc, 2) from None
    audit.append("admin.tenant_created", stream="_admin", actor=f"cli:{getpass.getuser()}", data={"tenant": name})
    console.print(f"created tenant {tenant.name}")


@tenants_app.command("list")
def tenants_list(root: RootOpt = Path("var"), as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    try:
        store, _ = _store(root)
    except ConfigError as exc:
        raise _fail(exc, 2) from None
    tenants = store.list_tenants()
    if as_json:
        print(json.dumps([t.__dict__ for t in tenants]))
        return
    table = Table("tenant", "created", "disabled")
    for t in tenants:
        table.add_row(t.name, t.created_at, str(t.disabled))
    console.print(table)


@keys_app.command("issue")
def keys_issue(tenant: str, root: RootOpt = Path("var"), label: str = "") -> None:
    """Issue a key; it is printed once and only its hash is stored."""
    try:
        store, audit = _store(root)
        issued = store.issue_key(tenant, label)
    except (TenancyError, ConfigError) as exc:
        raise _fail(exc, 2) from None
    audit.append("admin.key_issued", stream="_admin", actor=f"cli:{getpass.getuser()}",
                 data={"tenant": tenant, "key_id": issued.key_id, "label": label})
    print(issued.secret)


@keys_app.command("revoke")
def keys_revoke(key_id: str, root: RootOpt = Path("var")) -> None:
    try:
        store, audit = _store(root)
        store.revoke_key(key_id)
    except (TenancyError, ConfigError) as exc:
        raise _fail(exc, 2) from None
    audit.append("admin.key_revoked", stream="_admin", actor=f"cli:{getpass.getuser()}", data={"key_id": key_id})
    console.print(f"revoked {key_id}")


def _mount_audit() -> None:
    try:
        from appliance.audit.cli import app as audit_app
    except ImportError:  # pragma: no cover - the audit package is part of this distribution
        return
    app.add_typer(audit_app, name="audit", help="Verify and export the tamper-evident audit log.")


_mount_audit()


def main() -> None:
    app()
