"""``appliance audit ...``: verify the log, export a tenant's records, verify an export offline.

Each command is a plain function (``run_verify``, ``run_export``, ``run_verify_export``,
``run_public_key``, ``run_checkpoint``) that returns the exit code, so the appliance CLI can call
it with options it resolved itself; the Typer commands are thin wrappers. Exit codes: 0 all
checks passed, 1 a verification failed, 2 the command could not run (bad arguments, missing
file or key, database unavailable).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from appliance.audit.db_verify import verify_database
from appliance.audit.errors import AuditError, AuditIntegrityError
from appliance.audit.export import export_stream
from appliance.audit.keys import AuditKeys, public_key_from_pem
from appliance.audit.log import AuditLog
from appliance.audit.schema import make_engine
from appliance.audit.verify_export import verify_export

EXIT_OK, EXIT_FAILED, EXIT_ERROR = 0, 1, 2

app = typer.Typer(help="Tamper-evident audit log: verify, export, verify exports offline.", no_args_is_help=True)


def _consoles(console: Console | None) -> tuple[Console, Console]:
    return console or Console(), Console(stderr=True)


def _emit_json(console: Console, obj: Any) -> None:
    console.out(json.dumps(obj, indent=2, sort_keys=True), highlight=False)


def run_verify(db: str, *, key: Path | None = None, public_key: Path | None = None, stream: str | None = None,
               as_json: bool = False, console: Console | None = None) -> int:
    """Verify every chain in ``db`` (or one stream) with the signing key's or a PEM public key."""
    out, err = _consoles(console)
    try:
        if key is not None:
            pub = AuditKeys(key, create=False).public_key
        elif public_key is not None:
            pub = public_key_from_pem(Path(public_key).read_bytes())
        else:
            err.print("audit verify: expected --key or --public-key (checkpoints are always checked), found neither")
            return EXIT_ERROR
        report = verify_database(make_engine(db, create=False), pub, stream)
    except (AuditError, OSError, ValueError) as exc:
        err.print(f"audit verify: {exc}", markup=False)
        return EXIT_ERROR
    if as_json:
        _emit_json(out, report.to_dict())
    else:
        table = Table(title=f"Audit chains ({report.streams_checked} streams, {report.records_checked} records)")
        for column in ("Stream", "Records", "Head seq", "Last checkpoint", "Result", "First failure"):
            table.add_column(column)
        for s in report.streams:
            table.add_row(s.stream, str(s.records), str(s.head_seq or "-"), str(s.last_checkpoint_seq or "-"),
                          "[green]ok[/]" if s.ok else "[red]FAILED[/]",
                          "" if s.failure is None else s.failure.describe())
        out.print(table)
    return EXIT_OK if report.ok else EXIT_FAILED


def run_export(db: str, *, key: Path, tenant: str, since: str | None, until: str | None, out: Path,
               overwrite: bool = False, as_json: bool = False, console: Console | None = None) -> int:
    """Export ``tenant``'s stream for ``[since, until)`` to the signed tar ``out``."""
    stdout, err = _consoles(console)
    try:
        log = AuditLog(db, key, create=False)
        try:
            path = export_stream(log, tenant, since, until, out, overwrite=overwrite)
        finally:
            log.close()
    except AuditError as exc:
        err.print(f"audit export: {exc}", markup=False)
        return EXIT_FAILED if isinstance(exc, AuditIntegrityError) else EXIT_ERROR
    except (OSError, ValueError) as exc:
        err.print(f"audit export: {exc}", markup=False)
        return EXIT_ERROR
    if as_json:
        _emit_json(stdout, {"ok": True, "path": str(path)})
    else:
        stdout.print(f"exported stream {tenant!r} to {path}", markup=False)
    return EXIT_OK


def run_verify_export(path: Path, *, public_key: Path, as_json: bool = False,
                      console: Console | None = None) -> int:
    """Verify an export offline; prints every numbered check."""
    out, _ = _consoles(console)
    report = verify_export(path, public_key)
    if as_json:
        _emit_json(out, report.to_dict())
    else:
        table = Table(title=f"Export {path} (stream {report.stream!r})")
        for column in ("#", "Check", "Result", "Detail"):
            table.add_column(column)
        for c in report.checks:
            table.add_row(str(c.number), c.name, "[green]ok[/]" if c.passed else "[red]FAILED[/]", c.detail)
        out.print(table)
        first = report.first_failure
        if first is None:
            out.print(f"[green]VERIFIED[/]: {report.count} records, seq {report.first_seq}..{report.last_seq}")
        else:
            out.print(f"[red]NOT VERIFIED[/]: check {first.number} ({first.name}) failed", markup=True)
            out.print(f"  expected: {first.expected}\n  found:    {first.found}", markup=False)
    return EXIT_OK if report.ok else EXIT_FAILED


def run_public_key(*, key: Path, out: Path, console: Console | None = None) -> int:
    """Write the audit public key (PEM) to ``out`` for compliance officers."""
    stdout, err = _consoles(console)
    try:
        keys = AuditKeys(key, create=False)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
        with os.fdopen(fd, "wb") as handle:
            handle.write(keys.public_key_pem())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except (AuditError, OSError) as exc:
        err.print(f"audit public-key: {exc}", markup=False)
        return EXIT_ERROR
    stdout.print(f"wrote audit public key {keys.key_id} to {out}", markup=False)
    return EXIT_OK


def run_checkpoint(db: str, *, key: Path, as_json: bool = False, console: Console | None = None) -> int:
    """Sign the head of every stream now (after re-verifying each since its last checkpoint)."""
    out, err = _consoles(console)
    try:
        log = AuditLog(db, key, create=False)
        try:
            signed = log.checkpoint()
        finally:
            log.close()
    except AuditError as exc:
        err.print(f"audit checkpoint: {exc}", markup=False)
        return EXIT_FAILED if isinstance(exc, AuditIntegrityError) else EXIT_ERROR
    if as_json:
        _emit_json(out, [cp.to_dict() for cp in signed])
    else:
        for cp in signed:
            out.print(f"{cp.stream}: seq {cp.seq} hash {cp.hash} signed {cp.ts}", markup=False)
    return EXIT_OK


DbOpt = Annotated[str, typer.Option("--db", help="Database URL, e.g. sqlite:////var/lib/appliance/audit.db")]
KeyOpt = Annotated[Path, typer.Option("--key", help="Audit signing key file (0600)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output")]


@app.command("verify")
def verify_cmd(
    db: DbOpt,
    key: Annotated[Path | None, typer.Option("--key", help="Audit signing key file")] = None,
    public_key: Annotated[Path | None, typer.Option("--public-key", help="Audit public key PEM")] = None,
    stream: Annotated[str | None, typer.Option("--stream", help="Only this stream")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Verify every hash chain and signed checkpoint; exit 1 on any failure."""
    raise typer.Exit(run_verify(db, key=key, public_key=public_key, stream=stream, as_json=as_json))


@app.command("export")
def export_cmd(
    db: DbOpt, key: KeyOpt,
    tenant: Annotated[str, typer.Option("--tenant", help="Tenant (stream) to export; '_admin' for admin events")],
    out: Annotated[Path, typer.Option("--out", help="Export tar to write")],
    since: Annotated[str | None, typer.Option("--since", help="Start, RFC 3339, inclusive")] = None,
    until: Annotated[str | None, typer.Option("--until", help="End, RFC 3339, exclusive")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing file")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Export one tenant's records for a period as a signed tar."""
    raise typer.Exit(run_export(db, key=key, tenant=tenant, since=since, until=until, out=out,
                                overwrite=overwrite, as_json=as_json))


@app.command("verify-export")
def verify_export_cmd(
    path: Annotated[Path, typer.Argument(help="Export tar (or its extracted directory)")],
    public_key: Annotated[Path, typer.Option("--public-key", help="Audit public key PEM")],
    as_json: JsonOpt = False,
) -> None:
    """Verify an export offline with only the export and the public key; exit 0 or 1."""
    raise typer.Exit(run_verify_export(path, public_key=public_key, as_json=as_json))


@app.command("public-key")
def public_key_cmd(key: KeyOpt, out: Annotated[Path, typer.Option("--out", help="PEM file to write")]) -> None:
    """Write the audit public key for compliance officers."""
    raise typer.Exit(run_public_key(key=key, out=out))


@app.command("checkpoint")
def checkpoint_cmd(db: DbOpt, key: KeyOpt, as_json: JsonOpt = False) -> None:
    """Sign every stream's head now."""
    raise typer.Exit(run_checkpoint(db, key=key, as_json=as_json))
