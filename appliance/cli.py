"""The ``appliance`` command: quickstart, serve, tenants, keys, admins, audit."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from appliance.errors import ApplianceError
from appliance.identity_cli import admins_app, keys_app, tenants_app

app = typer.Typer(help="Sovereign inference appliance.", no_args_is_help=True, add_completion=False)
app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")
app.add_typer(admins_app, name="admins")
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
def serve(root: RootOpt = Path("var"), host: str | None = None, port: int | None = None,
          workers: Annotated[int | None, typer.Option(
              "--workers", help="Gateway processes accepting on the port (default: gateway.workers in "
                                "appliance.yaml, else 1). More than 1 needs engine nodes (fleet: in appliance.yaml)."
          )] = None) -> None:
    """Serve an installed appliance (ROOT/current) over HTTPS."""
    from appliance.config import load_config
    from appliance.gateway_roles import apply_roles
    from appliance.runtime import Runtime
    from appliance.server import build_server
    from appliance.workers import check_can_run_workers, serve_workers

    logging.basicConfig(level=logging.WARNING)
    try:
        config = load_config(root)
        count = config.gateway_workers if workers is None else workers
        check_can_run_workers(config, count)
        if count > 1:
            raise typer.Exit(serve_workers(root, host, port, count, say=console.print))
        runtime = Runtime.open(root)
        apply_roles(runtime, 0)
        server = build_server(runtime, host or runtime.config.host, port or runtime.config.port)
    except ApplianceError as exc:
        raise _fail(exc) from None
    console.print(f"serving on https://{host or runtime.config.host}:{port or runtime.config.port}")
    server.run()


def _mount_audit() -> None:
    try:
        from appliance.audit.cli import app as audit_app
    except ImportError:  # pragma: no cover - the audit package is part of this distribution
        return
    app.add_typer(audit_app, name="audit", help="Verify and export the tamper-evident audit log.")


_mount_audit()


def _mount_nodes() -> None:
    from appliance.nodes_cli import node_app, nodes_app

    app.add_typer(node_app, name="node")
    app.add_typer(nodes_app, name="nodes")


_mount_nodes()


def _mount_db() -> None:
    from appliance.db_cli import db_app

    app.add_typer(db_app, name="db")


_mount_db()


def _mount_policy() -> None:
    from appliance.policy_cli import policy_app

    app.add_typer(policy_app, name="policy")


_mount_policy()


def _mount_sla() -> None:
    from appliance.sla_cli import sla_app

    app.add_typer(sla_app, name="sla")


_mount_sla()


def main() -> None:
    app()
