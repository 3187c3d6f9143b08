"""`sovereign-installer`: preflight, verify, install, upgrade, rollback, start, stop, restart,
status, uninstall.

Exit codes: 0 ok; 1 verification or preflight failure (or a refused release); 2 usage or
input error; 3 ansible failure; 4 the new release failed its health check on a node and that
node was rolled back to its previous release (running again); 130 stopped by Ctrl-C or SIGTERM
(journalled as interrupted; running the same command again resumes). ``--json`` prints one JSON
document on stdout; progress and messages go to stderr.
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
from installer.errors import EXIT_INPUT, EXIT_INTERRUPTED, EXIT_OK, EXIT_REFUSED, InputError, InstallerError
from installer.first_admin import appliance_ran, issue_first_admin_key
from installer.frozen import prepare_process
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
StartOpt = Annotated[bool, typer.Option("--start/--no-start", help="Put the release in service: (re)start the "
                                        "appliance and wait for its HTTPS health check (--no-start: only switch "
                                        "current).")]

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
    """Check this machine: python3, OS/glibc, disk, memory, gateway port, GPUs, ansible, egress firewall."""
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
    base_dir = None
    if root is not None:  # a delta bundle reads its unchanged files from the installed base release
        from installer.install import delta_base_dir

        try:
            base_dir = delta_base_dir(bundle, RootLayout(root))
        except InstallerError as exc:
            raise _fail(exc, as_json) from exc
    try:
        report = verify_bundle(bundle, trusted_root, state_dir=RootLayout(root).trust if root else None,
                               progress=ByteProgress(None if as_json else err_console), base_dir=base_dir)
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


def _error_extra(exc: InstallerError) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    report_obj = getattr(exc, "report", None)
    if report_obj is not None and hasattr(report_obj, "to_dict"):
        extra["verification"] = report_obj.to_dict()
    result_obj = getattr(exc, "result", None)
    if result_obj is not None and hasattr(result_obj, "to_dict"):
        extra["playbook"] = result_obj.to_dict()
    return extra


def _install(upgrade: bool, bundle: Path, trusted_root: Path, root: Path, inventory: Path | None,
             allow_cpu: bool, skip_preflight: bool, as_json: bool, start: bool) -> None:
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
    ran_before = appliance_ran(root)  # asked now: an install that starts the appliance creates its database
    try:
        result = install_bundle(bundle, trusted_root, root, inv, console=console, upgrade=upgrade, start=start)
    except InstallerError as exc:
        raise _fail(exc, as_json, _error_extra(exc)) from exc
    except KeyboardInterrupt as exc:
        raise _interrupted("upgrade" if upgrade else "install", exc, as_json) from exc
    _print_result(result, as_json, issue_first_admin_key(result.root, ran_before=ran_before))


def _interrupted(action: str, exc: KeyboardInterrupt, as_json: bool) -> typer.Exit:
    """Ctrl-C or SIGTERM: the run has journalled it and cleaned its staging; say how to go on."""
    how = str(exc) or "Ctrl-C"
    message = (f"{action} stopped by {how}; run the same command again to resume it "
               "(or `sovereign-installer rollback` to go back)")
    if as_json:
        _emit_json({"ok": False, "exit_code": EXIT_INTERRUPTED, "error": "Interrupted", "message": message})
    else:
        err_console.print(f"[bold red]interrupted[/bold red]: {message}", highlight=False)
    return typer.Exit(EXIT_INTERRUPTED)


def _print_result(result: InstallResult, as_json: bool, first_admin_key: str | None = None) -> None:
    if as_json:
        _emit_json({**result.to_dict(), **({"first_admin_key": first_admin_key} if first_admin_key else {})})
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
    table.add_row("appliance", "running, healthy" if result.started else "not started (--no-start)")
    for note in result.notes:
        table.add_row("note", note)
    if first_admin_key:
        table.add_row("first admin key", f"{first_admin_key} (admin 'admin'; shown once, and kept in "
                      f"{result.root / 'secrets' / 'admin.key'} (0600) until you move it)")
    if result.timings:
        table.add_row("seconds", ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items()))
    out_console.print(table)


@app.command()
def install(bundle: BundleOpt, trusted_root: TrustOpt, root: RootOpt = DEFAULT_ROOT, inventory: InventoryOpt = None,
            allow_cpu: AllowCpuOpt = False,
            skip_preflight: Annotated[bool, typer.Option("--skip-preflight", help="Do not run preflight first "
                                                          "(verification always runs).")] = False,
            start: StartOpt = True, as_json: JsonOpt = False) -> None:
    """Verify a bundle, install it and start the appliance; a second run of the same bundle changes nothing."""
    _install(False, bundle, trusted_root, root, inventory, allow_cpu, skip_preflight, as_json, start)


@app.command()
def upgrade(bundle: BundleOpt, trusted_root: TrustOpt, root: RootOpt = DEFAULT_ROOT, inventory: InventoryOpt = None,
            allow_cpu: AllowCpuOpt = False,
            skip_preflight: Annotated[bool, typer.Option("--skip-preflight")] = False,
            start: StartOpt = True, as_json: JsonOpt = False) -> None:
    """Install a newer release beside the current one and put it in service node by node; a failing node is rolled back.

    Per node: stop the appliance, switch current, start the new release and wait for its HTTPS health check. On any
    failure the node is switched back, its previous release started again, and the exit code is 4."""
    _install(True, bundle, trusted_root, root, inventory, allow_cpu, skip_preflight, as_json, start)


@app.command("rollback")
def rollback_cmd(root: RootOpt = DEFAULT_ROOT, inventory: InventoryOpt = None,
                 to: Annotated[str | None, typer.Option("--to", help="Release version (default: previous).")] = None,
                 start: StartOpt = True, as_json: JsonOpt = False) -> None:
    """Put an installed release back in service after re-checking its files."""
    inv = _load_inventory(inventory, as_json)
    try:
        result = rollback(root, to, inv, console=err_console, start=start)
    except InstallerError as exc:
        raise _fail(exc, as_json, _error_extra(exc)) from exc
    except KeyboardInterrupt as exc:
        raise _interrupted("rollback", exc, as_json) from exc
    _print_result(result, as_json)


def _service(action: str, root: Path, inventory: Path | None, as_json: bool) -> None:
    from installer.service import control_service

    inv = _load_inventory(inventory, as_json)
    try:
        result = control_service(root, action, inv, console=err_console)
    except InstallerError as exc:
        raise _fail(exc, as_json, _error_extra(exc)) from exc
    if as_json:
        _emit_json(result.to_dict())
        return
    for note in result.notes or ["nothing to do"]:
        out_console.print(f"{action}: {note}", highlight=False)


@app.command()
def start(root: RootOpt = DEFAULT_ROOT, inventory: InventoryOpt = None, as_json: JsonOpt = False) -> None:
    """Start the appliance of the current release and wait for its HTTPS health check."""
    _service("start", root, inventory, as_json)


@app.command()
def stop(root: RootOpt = DEFAULT_ROOT, inventory: InventoryOpt = None, as_json: JsonOpt = False) -> None:
    """Stop the appliance (SIGTERM; SIGKILL after the inventory's service.stop_timeout_s)."""
    _service("stop", root, inventory, as_json)


@app.command()
def restart(root: RootOpt = DEFAULT_ROOT, inventory: InventoryOpt = None, as_json: JsonOpt = False) -> None:
    """Stop and start the appliance node by node, waiting for each node's health check."""
    _service("restart", root, inventory, as_json)


@app.command("uninstall")
def uninstall_cmd(root: RootOpt = DEFAULT_ROOT, inventory: InventoryOpt = None,
                  purge_audit: Annotated[int, typer.Option("--purge-audit", count=True, help=(
                      "Give it twice to delete the audit data too (data/, journal/, trust state, audit key)."))] = 0,
                  as_json: JsonOpt = False) -> None:
    """Stop the appliance and remove the releases; audit data stays unless --purge-audit is given twice."""
    from installer.uninstall import uninstall

    if purge_audit == 1:
        exc = InputError("--purge-audit: expected it twice to delete the audit log irrevocably, found it once; "
                         "nothing was removed")
        raise _fail(exc, as_json)
    inv = _load_inventory(inventory, as_json)
    try:
        result = uninstall(root, inv, purge_audit=purge_audit >= 2, console=err_console)
    except InstallerError as exc:
        raise _fail(exc, as_json, _error_extra(exc)) from exc
    if as_json:
        _emit_json(result.to_dict())
        return
    for note in result.notes:
        out_console.print(f"uninstall: {note}", highlight=False)
    if result.purged:
        out_console.print(f"uninstalled; removed {result.root} entirely, audit data included", highlight=False)
    else:
        out_console.print(f"uninstalled release {result.version or '-'}; kept in {result.root}: "
                          f"{', '.join(result.kept) or 'nothing'}", highlight=False)


def _print_pki(pki: dict[str, Any] | None) -> None:
    """The installation CA's fingerprint and each node certificate's expiry."""
    if pki is None:
        out_console.print("internal CA: none yet (the first install creates it)")
        return
    out_console.print(f"internal CA: {pki.get('ca_fingerprint') or 'unreadable'}, valid until "
                      f"{pki.get('ca_not_after') or '-'} ({pki.get('detail')})", highlight=False)
    table = Table(title="Node certificates")
    for col in ("Node", "Certificate", "Valid until", "Days left"):
        table.add_column(col)
    for c in pki.get("certificates", []):
        days = c.get("days_left")
        colour = "red" if days is None or days < 30 else "green"
        table.add_row(c["node"], c["certificate"], c.get("not_after") or c.get("detail", "-"),
                      f"[{colour}]{days if days is not None else '-'}[/{colour}]")
    out_console.print(table)


@app.command()
def status(root: RootOpt = DEFAULT_ROOT, as_json: JsonOpt = False) -> None:
    """Releases present, the current one, the bundle it came from, the appliance's health, the internal CA."""
    report = read_status(root)
    if as_json:
        _emit_json(report.to_dict())
        return
    if report.interrupted:
        out_console.print(f"[bold yellow]interrupted run[/bold yellow]: {report.interrupted}", highlight=False)
    if not report.releases:
        out_console.print(f"{report.root}: no release installed")
        return
    table = Table(title=f"Releases in {report.root}")
    for col in ("Version", "Current", "Model", "Runtime"):
        table.add_column(col)
    table.add_column("Bundle digest", overflow="fold")
    for r in report.releases:
        runtime = "node" if r.runtime == "node" else r.runtime + ("" if r.runtime_present else " [red](missing)[/red]")
        table.add_row(r.version, "[green]*[/green]" if r.current else "", r.model, runtime, r.bundle_digest)
    out_console.print(table)
    out_console.print(f"current: {report.current or '-'}")
    svc = report.service
    if svc is None:
        out_console.print("appliance: never started here by the supervisor")
    elif svc.running:
        colour = "green" if svc.healthy else "red"
        out_console.print(f"appliance: [{colour}]running[/{colour}] pid {svc.pid}, {svc.url}, version {svc.version}, "
                          f"{'healthy' if svc.healthy else 'NOT healthy'}", highlight=False)
    else:
        out_console.print(f"appliance: [yellow]stopped[/yellow] ({svc.detail})", highlight=False)
    _print_pki(report.pki)
    if report.last_rollout and report.last_rollout.get("result") != "ok":
        ro = report.last_rollout
        out_console.print(f"last rollout: {ro.get('version')} on {ro.get('node')} was [red]{ro.get('result')}[/red]: "
                          f"{ro.get('error')}", highlight=False)
    if report.last_action:
        a = report.last_action
        out_console.print(f"last action: {a.get('ts')} {a.get('actor')} {a.get('action')} {a.get('version')} "
                          f"-> {a.get('result')}", highlight=False)


def main(argv: list[str] | None = None) -> None:
    """Console entry point. The frozen executable also serves as its own ansible-playbook."""
    prepare_process()
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == [FROZEN_SUBCOMMAND]:
        from installer.ansible_entry import main as ansible_main

        ansible_main(args[1:])
        return
    app(args=args, prog_name="sovereign-installer")


if __name__ == "__main__":
    main()
