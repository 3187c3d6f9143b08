"""`sovereign-installer`: preflight, verify, install, upgrade, rollback, status.

Exit codes: 0 ok; 1 verification or preflight failure (or a refused release); 2 usage or
input error; 3 ansible failure. ``--json`` prints one JSON document on stdout; progress and
messages go to stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from installer.ansible_entry import FROZEN_SUBCOMMAND
from installer.errors import EXIT_INPUT, EXIT_OK, EXIT_REFUSED, InstallerError
from installer.install import InstallResult, install_bundle
from installer.inventory import Inventory, load_inventory
from installer.preflight import FAIL, PASS, PreflightReport, run_preflight
from installer.rollback import rollback
from installer.status import read_status

DEFAULT_ROOT = Path("/opt/sovereign-appliance")

app = typer.Typer(name="sovereign-installer", add_completion=False, no_args_is_help=True,
                  help="Offline installer for the sovereign inference appliance.")

RootOpt = Annotated[Path, typer.Option("--root", envvar="SOVEREIGN_ROOT", help="Appliance root directory.")]
InventoryOpt = Annotated[Path | None, typer.Option("--inventory", "-i", help="Inventory YAML (default: this node).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
BundleOpt = Annotated[Path, typer.Option("--bundle", "-b", help="Bundle .tar to install.")]
TrustOpt = Annotated[Path, typer.Option("--trusted-root", "-r", help="Trusted root.json, received out of band.")]
AllowCpuOpt = Annotated[bool, typer.Option("--allow-cpu", help="Accept a node without an NVIDIA GPU.")]

err_console = Console(stderr=True)
out_console = Console()


def _emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _fail(exc: InstallerError, as_json: bool, extra: dict[str, Any] | None = None) -> typer.Exit:
    if as_json:
        _emit_json({"ok": False, "exit_code": exc.exit_code, "error": type(exc).__name__, "message": str(exc),
                    **(extra or {})})
    else:
        err_console.print(f"[bold red]error[/bold red] ({type(exc).__name__}): {exc}", highlight=False)
    return typer.Exit(exc.exit_code)


def _load_inventory(path: Path | None, as_json: bool) -> Inventory:
    try:
        return load_inventory(path)
    except InstallerError as exc:
        raise _fail(exc, as_json) from exc


def _preflight_table(report: PreflightReport) -> Table:
    table = Table(title="Preflight")
    for col in ("Check", "Status"):
        table.add_column(col, no_wrap=True)
    for col in ("Detail", "Fix"):
        table.add_column(col, overflow="fold")
    colours = {PASS: "green", FAIL: "red"}
    for c in report.checks:
        colour = colours.get(c.status, "yellow")
        table.add_row(c.name, f"[{colour}]{c.status}[/{colour}]", c.detail, c.fix)
    return table


@app.command()
def preflight(root: RootOpt = DEFAULT_ROOT, inventory: InventoryOpt = None,
              bundle: Annotated[Path | None, typer.Option("--bundle", "-b", help="Size disk needs from it.")] = None,
              allow_cpu: AllowCpuOpt = False, as_json: JsonOpt = False) -> None:
    """Check this machine: python3, OS/glibc, disk, memory, gateway port, GPUs, ansible."""
    inv = _load_inventory(inventory, as_json)
    report = run_preflight(root, inventory=inv, bundle=bundle, allow_cpu=allow_cpu)
    if as_json:
        _emit_json(report.to_dict())
    else:
        out_console.print(_preflight_table(report))
    raise typer.Exit(EXIT_OK if report.ok else EXIT_REFUSED)


@app.command()
def verify(bundle: BundleOpt, trusted_root: TrustOpt,
           root: Annotated[Path | None, typer.Option("--root", help="Compare with ROOT/state/trust.")] = None,
           as_json: JsonOpt = False) -> None:
    """Verify a bundle without installing anything (writes nothing)."""
    from airgap_bundle import BundleError, verify_bundle
    from installer.display import ByteProgress
    from installer.layout import RootLayout

    if not bundle.is_file() or not trusted_root.is_file():
        missing = bundle if not bundle.is_file() else trusted_root
        err_console.print(f"[red]error[/red]: expected a file, found nothing at {missing}")
        raise typer.Exit(EXIT_INPUT)
    try:
        report = verify_bundle(bundle, trusted_root, state_dir=RootLayout(root).trust if root else None,
                               progress=ByteProgress(None if as_json else err_console))
    except BundleError as exc:
        err_console.print(f"[red]error[/red]: {exc}")
        raise typer.Exit(EXIT_REFUSED) from exc
    if as_json:
        _emit_json(report.to_dict())
    else:
        table = Table(title=f"Verification of {bundle.name}")
        for col in ("#", "Check", "Result", "Detail"):
            table.add_column(col)
        for c in report.checks:
            result = "[dim]skipped[/dim]" if c.skipped else ("[green]pass[/green]" if c.passed else "[red]FAIL[/red]")
            table.add_row(str(c.number), c.name, result, f"[{c.path}] {c.detail}" if c.path else c.detail)
        out_console.print(table)
        out_console.print(f"{bundle.name} ({report.name} {report.version}) {report.digest}: "
                          + ("[green]verified[/green]" if report.ok else "[red]NOT verified[/red]"))
    raise typer.Exit(EXIT_OK if report.ok else EXIT_REFUSED)


def _install(upgrade: bool, bundle: Path, trusted_root: Path, root: Path, inventory: Path | None,
             allow_cpu: bool, skip_preflight: bool, as_json: bool) -> None:
    inv = _load_inventory(inventory, as_json)
    console = err_console
    if not skip_preflight:
        report = run_preflight(root, inventory=inv, bundle=bundle if bundle.is_file() else None, allow_cpu=allow_cpu)
        if not report.ok:
            if as_json:
                _emit_json({"ok": False, "exit_code": EXIT_REFUSED, "error": "PreflightFailed",
                            "message": "preflight failed", "preflight": report.to_dict()})
            else:
                err_console.print(_preflight_table(report))
                err_console.print("[red]preflight failed[/red]: fix the failed checks (or --skip-preflight)")
            raise typer.Exit(EXIT_REFUSED)
    try:
        result = install_bundle(bundle, trusted_root, root, inv, console=console, upgrade=upgrade)
    except InstallerError as exc:
        extra: dict[str, Any] = {}
        report_obj = getattr(exc, "report", None)
        if report_obj is not None and hasattr(report_obj, "to_dict"):
            extra["verification"] = report_obj.to_dict()
        result_obj = getattr(exc, "result", None)
        if result_obj is not None and hasattr(result_obj, "to_dict"):
            extra["playbook"] = result_obj.to_dict()
        raise _fail(exc, as_json, extra) from exc
    _print_result(result, as_json)


def _print_result(result: InstallResult, as_json: bool) -> None:
    if as_json:
        _emit_json(result.to_dict())
        return
    table = Table(title=f"{result.action} {result.version}", show_header=False)
    table.add_column("what")
    table.add_column("value", overflow="fold")
    table.add_row("root", str(result.root))
    table.add_row("release", str(result.release_dir))
    table.add_row("bundle digest", result.bundle_digest)
    table.add_row("nodes", ", ".join(result.nodes))
    table.add_row("changes", str(result.changed) + (" (already installed)" if result.already_installed else ""))
    table.add_row("current", f"{result.previous or '-'} -> {result.version}" if result.switched else result.version)
    for note in result.notes:
        table.add_row("note", note)
    out_console.print(table)


@app.command()
def install(bundle: BundleOpt, trusted_root: TrustOpt, root: RootOpt = DEFAULT_ROOT, inventory: InventoryOpt = None,
            allow_cpu: AllowCpuOpt = False,
            skip_preflight: Annotated[bool, typer.Option("--skip-preflight", help="Do not run preflight first "
                                                          "(verification always runs).")] = False,
            as_json: JsonOpt = False) -> None:
    """Verify a bundle and install it; a second run of the same bundle changes nothing."""
    _install(False, bundle, trusted_root, root, inventory, allow_cpu, skip_preflight, as_json)


@app.command()
def upgrade(bundle: BundleOpt, trusted_root: TrustOpt, root: RootOpt = DEFAULT_ROOT, inventory: InventoryOpt = None,
            allow_cpu: AllowCpuOpt = False,
            skip_preflight: Annotated[bool, typer.Option("--skip-preflight")] = False,
            as_json: JsonOpt = False) -> None:
    """Install a newer release next to the current one and switch to it."""
    _install(True, bundle, trusted_root, root, inventory, allow_cpu, skip_preflight, as_json)


@app.command("rollback")
def rollback_cmd(root: RootOpt = DEFAULT_ROOT, inventory: InventoryOpt = None,
                 to: Annotated[str | None, typer.Option("--to", help="Release version (default: previous).")] = None,
                 as_json: JsonOpt = False) -> None:
    """Switch current back to an installed release after re-checking its files."""
    inv = _load_inventory(inventory, as_json)
    try:
        result = rollback(root, to, inv, console=err_console)
    except InstallerError as exc:
        raise _fail(exc, as_json) from exc
    _print_result(result, as_json)


@app.command()
def status(root: RootOpt = DEFAULT_ROOT, as_json: JsonOpt = False) -> None:
    """Releases present, the current one and the bundle it came from."""
    report = read_status(root)
    if as_json:
        _emit_json(report.to_dict())
        return
    if not report.releases:
        out_console.print(f"{report.root}: no release installed")
        return
    table = Table(title=f"Releases in {report.root}")
    for col in ("Version", "Current", "Model"):
        table.add_column(col)
    table.add_column("Bundle digest", overflow="fold")
    for r in report.releases:
        table.add_row(r.version, "[green]*[/green]" if r.current else "", r.model, r.bundle_digest)
    out_console.print(table)
    out_console.print(f"current: {report.current or '-'}")
    if report.last_action:
        a = report.last_action
        out_console.print(f"last action: {a.get('ts')} {a.get('actor')} {a.get('action')} {a.get('version')} "
                          f"-> {a.get('result')}", highlight=False)


def main(argv: list[str] | None = None) -> None:
    """Console entry point. The frozen executable also serves as its own ansible-playbook."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == [FROZEN_SUBCOMMAND]:
        from installer.ansible_entry import main as ansible_main

        ansible_main(args[1:])
        return
    app(args=args, prog_name="sovereign-installer")


if __name__ == "__main__":
    main()
