"""``appliance sla report|verify``: a tenant's signed monthly SLA report, and its offline check.

``report`` runs on the appliance host with the install root (the audit database, signing key and
policies are found from ``ROOT/current/appliance.yaml``): it verifies the tenant's audit stream,
computes the report from it (``sla_report``), writes the files with a signed manifest
(``sla_report_files``) and records ``admin.sla_report`` (tenant, period, file digests) on
``_admin``. ``verify`` needs only the report directory and the audit public key
(``appliance audit public-key``). Exit codes: 0 done / verified, 1 the log or the report does not
verify, 2 the command could not run (bad period or tenant, missing files).
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from appliance.audit.cli import record_admin_event
from appliance.audit.errors import AuditError, AuditIntegrityError
from appliance.audit.log import AuditLog
from appliance.audit.record import ADMIN_STREAM
from appliance.errors import ApplianceError
from appliance.sla_report import POLICY_EVENTS, Period, SlaReportError, compute_report
from appliance.sla_report_files import FORMATS, MANIFEST_NAME, render, verify_report_dir, write_signed
from policies import PolicySet
from policies.documents import NAME_PATTERN

EXIT_OK, EXIT_FAILED, EXIT_ERROR = 0, 1, 2
LOOKBACK = timedelta(days=2)  # accepted records of requests that end in the period (and a margin)

sla_app = typer.Typer(help="SLA reports: attainment per class from the audit log, signed.", no_args_is_help=True)


def _check_tenant_name(tenant: str) -> None:
    if not re.match(NAME_PATTERN, tenant):
        raise SlaReportError(f"tenant: expected a tenant name matching {NAME_PATTERN}, found {tenant[:80]!r}")


def make_report(log: AuditLog, policies: PolicySet, tenant: str, period: Period, fmt: str, out: Path,
                now: datetime | None = None) -> dict[str, Any]:
    """Compute, render, sign and record the report; returns its manifest. Raises SlaReportError
    (bad request), AuditIntegrityError (the stream does not verify) or AuditError."""
    _check_tenant_name(tenant)
    if fmt not in FORMATS:
        raise SlaReportError(f"format: expected one of {list(FORMATS)}, found {fmt!r}")
    if (Path(out) / MANIFEST_NAME).exists():
        raise SlaReportError(f"output directory {out}: expected no signed report in it, found {MANIFEST_NAME}")
    streams = set(log.streams())
    if tenant not in policies.tenants and tenant not in streams:
        raise SlaReportError(f"tenant: expected a tenant of the policy in force or one with audit records, "
                             f"found {tenant!r} (neither)")
    if tenant in streams:
        log.verify(tenant).raise_for_failure()
    now = now or datetime.now(UTC)
    records = log.iter_records(tenant, period.since - LOOKBACK, period.until) if tenant in streams else iter(())
    admin = (r for r in log.iter_records(ADMIN_STREAM, None, period.until) if r.event_type in POLICY_EVENTS) \
        if ADMIN_STREAM in streams else iter(())
    report = compute_report(tenant, period, records, policies, admin, now)
    files = render(report, fmt)
    manifest = write_signed(Path(out), report, files, log.keys)
    log.append("admin.sla_report", stream=ADMIN_STREAM, actor=_actor(), tenant=tenant, data={
        "tenant": tenant, "period": period.name, "format": fmt, "path": str(out)[-200:],
        "files": {name: entry["sha256"] for name, entry in manifest["files"].items()},
        "manifest_sha256": hashlib.sha256((Path(out) / MANIFEST_NAME).read_bytes()).hexdigest(),
        "policy_digests": manifest["policy_digests"], "key_id": manifest["key_id"]})
    return manifest


def _actor() -> str:
    from appliance.audit.cli import cli_actor

    return cli_actor()


def run_report(root: Path, *, tenant: str, period: str, fmt: str, out: Path, as_json: bool = False,
               console: Console | None = None) -> int:
    stdout, err = console or Console(), Console(stderr=True)
    try:
        parsed = Period.parse(period)
        _check_tenant_name(tenant)
        from appliance.config import load_config
        from policies.effective import applied_policy_dir, load_in_force

        config = load_config(root)
        policies = load_in_force(config.policies_dir, applied_policy_dir(config.data_dir))
        log = AuditLog(config.db_url, config.audit_key_path, create=False)
    except (ApplianceError, AuditError, OSError, ValueError) as exc:
        err.print(f"sla report: {exc}", markup=False, highlight=False)
        return EXIT_ERROR
    try:
        manifest = make_report(log, policies, tenant, parsed, fmt, out)
    except AuditIntegrityError as exc:
        record_admin_event(log, "admin.sla_report", tenant, {
            "tenant": tenant, "period": period, "result": f"refused: seq {exc.seq} does not verify"}, err)
        err.print(f"sla report: the audit stream of {tenant!r} does not verify: {exc}", markup=False)
        return EXIT_FAILED
    except (ApplianceError, AuditError, OSError, ValueError) as exc:
        err.print(f"sla report: {exc}", markup=False, highlight=False)
        return EXIT_ERROR
    finally:
        log.close()
    if as_json:
        stdout.out(json.dumps({"ok": True, "path": str(out), "manifest": manifest}, indent=2, sort_keys=True))
    else:
        stdout.print(f"SLA report of tenant {tenant!r} for {period}: {', '.join(manifest['files'])} in {out} "
                     f"(signed by key {manifest['key_id'][:16]}...)", markup=False, highlight=False)
    return EXIT_OK


def run_verify(path: Path, *, public_key: Path, as_json: bool = False, console: Console | None = None) -> int:
    out = console or Console()
    result = verify_report_dir(path, public_key)
    if as_json:
        out.out(json.dumps(result.to_dict(), indent=2, sort_keys=True))
        return EXIT_OK if result.ok else EXIT_FAILED
    table = Table(title=f"SLA report {path}")
    for column in ("#", "Check", "Result", "Detail"):
        table.add_column(column)
    for c in result.checks:
        table.add_row(str(c.number), c.name, "[green]ok[/]" if c.passed else "[red]FAILED[/]", c.detail)
    out.print(table)
    first = result.first_failure
    if first is None:
        out.print("[green]VERIFIED[/]: every file is the one the audit key signed")
        return EXIT_OK
    out.print(f"[red]NOT VERIFIED[/]: check {first.number} ({first.name}) failed:", markup=True)
    out.print(f"  {first.detail}", markup=False, highlight=False)
    return EXIT_FAILED


RootOpt = Annotated[Path, typer.Option("--root", help="Install root of the appliance.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


@sla_app.command("report")
def report_cmd(
    tenant: Annotated[str, typer.Option("--tenant", help="Tenant to report on.")],
    period: Annotated[str, typer.Option("--period", help="UTC month, YYYY-MM (e.g. 2026-12).")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the report and its signed manifest to.")],
    root: RootOpt = Path("var"),
    fmt: Annotated[str, typer.Option("--format", help="md, json, png or all.")] = "all",
    as_json: JsonOpt = False,
) -> None:
    """A tenant's SLA attainment for one month, from the audit log, signed with the audit key."""
    raise typer.Exit(run_report(root, tenant=tenant, period=period, fmt=fmt, out=out, as_json=as_json))


@sla_app.command("verify")
def verify_cmd(
    path: Annotated[Path, typer.Argument(help="Directory of a signed SLA report.")],
    key: Annotated[Path, typer.Option("--key", help="Audit public key PEM (appliance audit public-key).")],
    as_json: JsonOpt = False,
) -> None:
    """Verify a signed SLA report offline; exit 0 verified, 1 not."""
    raise typer.Exit(run_verify(path, public_key=key, as_json=as_json))
