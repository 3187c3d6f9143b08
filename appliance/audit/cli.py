"""``appliance audit ...``: verify the log, export a tenant's records, verify an export offline,
prove a record's inclusion or two checkpoints' consistency.

Each command is a plain function (``run_verify``, ``run_export``, ``run_verify_export``,
``run_public_key``, ``run_checkpoint``; ``cli_proofs.run_prove``, ``run_verify_proof``,
``run_consistency``) that returns the exit code, so the appliance CLI can call it with options
it resolved itself; the Typer commands are thin wrappers. Exit codes: 0 all checks passed, 1 a
verification failed, 2 the command could not run (bad arguments, missing file or key, database
unavailable).

Exports and verifications run with the database and the signing key are themselves recorded in
the log's ``_admin`` stream (``admin.audit_exported``, ``admin.audit_verified``; actor
``cli:<user>``; stream, period, count, result). An offline ``verify-export`` (no ``--db``) has
no log to record in.
"""

from __future__ import annotations

import getpass
import json
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from appliance.audit.cli_proofs import run_consistency, run_prove, run_verify_proof
from appliance.audit.db_verify import DEFAULT_UNSIGNED_GRACE_S, verify_database
from appliance.audit.errors import AuditError, AuditIntegrityError
from appliance.audit.export import export_with_manifest
from appliance.audit.export_format import FORMAT_FILES, PROOF_MODES
from appliance.audit.keys import AuditKeys, public_key_from_pem
from appliance.audit.log import AuditLog
from appliance.audit.retention_cli import retention_app
from appliance.audit.schema import make_engine
from appliance.audit.verify_export import verify_export
from appliance.audit.witness_cli import register as register_witness

EXIT_OK, EXIT_FAILED, EXIT_ERROR = 0, 1, 2

app = typer.Typer(help="Tamper-evident audit log: verify, export, verify exports offline.", no_args_is_help=True)


def _consoles(console: Console | None) -> tuple[Console, Console]:
    return console or Console(), Console(stderr=True)


def _emit_json(console: Console, obj: Any) -> None:
    console.out(json.dumps(obj, indent=2, sort_keys=True), highlight=False)


def cli_actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid{os.getuid()}"
    return f"cli:{user}"[:256]


def record_admin_event(log: AuditLog, event_type: str, tenant: str | None, data: dict[str, Any],
                       err: Console) -> bool:
    """Record an audit command in the log itself; a failure to record is reported, not hidden."""
    try:
        log.append(event_type, stream="_admin", actor=cli_actor(), tenant=tenant if tenant != "_admin" else None,
                   data=data)
    except AuditError as exc:
        err.print(f"warning: could not record {event_type} in the audit log: {exc}", markup=False)
        return False
    return True


def _record_with(db: str, key: Path, event_type: str, tenant: str | None, data: dict[str, Any], err: Console) -> None:
    try:
        log = AuditLog(db, key, create=False)
    except (AuditError, OSError, ValueError) as exc:
        err.print(f"warning: could not record {event_type} in the audit log: {exc}", markup=False)
        return
    try:
        record_admin_event(log, event_type, tenant, data, err)
    finally:
        log.close()


def run_verify(db: str, *, key: Path | None = None, public_key: Path | None = None, stream: str | None = None,
               as_json: bool = False, console: Console | None = None,
               unsigned_grace_s: float | None = DEFAULT_UNSIGNED_GRACE_S) -> int:
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
        report = verify_database(make_engine(db, create=False), pub, stream, unsigned_grace_s=unsigned_grace_s)
    except (AuditError, OSError, ValueError) as exc:
        err.print(f"audit verify: {exc}", markup=False)
        return EXIT_ERROR
    if key is not None:  # with the signing key the CLI can write: the verification is itself audited
        first = report.first_failure
        _record_with(db, key, "admin.audit_verified", stream, {
            "what": "database", "stream": stream or "*", "count": report.records_checked,
            "streams": report.streams_checked,
            "result": "ok" if first is None else f"failed: {first.stream} seq {first.seq} {first.check}"}, err)
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
               overwrite: bool = False, fmt: str = "jsonl", proofs: str = "ends", as_json: bool = False,
               console: Console | None = None) -> int:
    """Export ``tenant``'s stream for ``[since, until)`` to the signed tar ``out`` (recorded in the log)."""
    stdout, err = _consoles(console)
    try:
        log = AuditLog(db, key, create=False)
    except (AuditError, OSError, ValueError) as exc:
        err.print(f"audit export: {exc}", markup=False)
        return EXIT_ERROR
    event: dict[str, Any] = {"stream": tenant, "period": {"since": since, "until": until}, "format": fmt,
                             "proofs": proofs, "path": str(out)[-200:]}
    try:
        try:
            manifest = export_with_manifest(log, tenant, since, until, out, overwrite=overwrite, fmt=fmt,
                                            proofs=proofs)
        except AuditIntegrityError as exc:
            record_admin_event(log, "admin.audit_exported", tenant, {
                **event, "count": 0, "result": f"refused: {exc.stream} seq {exc.seq} does not verify"}, err)
            err.print(f"audit export: {exc}", markup=False)
            return EXIT_FAILED
        except (AuditError, OSError, ValueError) as exc:
            err.print(f"audit export: {exc}", markup=False)
            return EXIT_ERROR
        record_admin_event(log, "admin.audit_exported", tenant, {
            **event, "period": manifest["period"], "count": manifest["count"], "first_seq": manifest["first_seq"],
            "last_seq": manifest["last_seq"], "records_sha256": manifest["records_sha256"], "result": "ok"}, err)
    finally:
        log.close()
    if as_json:
        _emit_json(stdout, {"ok": True, "path": str(out), "count": manifest["count"],
                            "first_seq": manifest["first_seq"], "last_seq": manifest["last_seq"]})
    else:
        stdout.print(f"exported {manifest['count']} records of stream {tenant!r} to {out}", markup=False)
    return EXIT_OK


def run_verify_export(path: Path, *, public_key: Path, as_json: bool = False, db: str | None = None,
                      key: Path | None = None, console: Console | None = None) -> int:
    """Verify an export offline; prints every numbered check. With ``db`` and ``key`` (the
    appliance's own log) the verification is recorded there as well."""
    out, err = _consoles(console)
    report = verify_export(path, public_key)
    if (db is None) != (key is None):
        err.print("audit verify-export: --db and --key go together (to record the verification), found one")
        return EXIT_ERROR
    if db is not None and key is not None:
        first = report.first_failure
        _record_with(db, key, "admin.audit_verified", report.stream, {
            "what": "export", "file": Path(path).name[-200:], "stream": report.stream, "count": report.count,
            "period": report.extra.get("period"),
            "result": "ok" if first is None else f"failed: check {first.number} {first.name}"}, err)
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
            out.print(f"{cp.tree}: {cp.size} records, root {cp.root} signed {cp.ts}", markup=False)
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
    unsigned_grace: Annotated[float, typer.Option(
        "--unsigned-grace", min=0,
        help="Seconds a record may stay unsigned: older records that no checkpoint covers fail (the "
             "appliance signs every second; a cut log or a crash never followed by a restart leaves "
             "them). 0 for a log that is not being written.")] = DEFAULT_UNSIGNED_GRACE_S,
    as_json: JsonOpt = False,
) -> None:
    """Verify every hash chain, Merkle tree and signed checkpoint; exit 1 on any failure."""
    raise typer.Exit(run_verify(db, key=key, public_key=public_key, stream=stream, as_json=as_json,
                                unsigned_grace_s=unsigned_grace))


@app.command("export")
def export_cmd(
    db: DbOpt, key: KeyOpt,
    tenant: Annotated[str, typer.Option("--tenant", help="Tenant (stream) to export; '_admin' for admin events")],
    out: Annotated[Path, typer.Option("--out", help="Export tar to write")],
    since: Annotated[str | None, typer.Option("--since", help="Start, RFC 3339, inclusive")] = None,
    until: Annotated[str | None, typer.Option("--until", help="End, RFC 3339, exclusive")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing file")] = False,
    fmt: Annotated[str, typer.Option(
        "--format", help="jsonl (canonical records), csv (spreadsheets) or ocsf (OCSF 1.1 API Activity, for a "
        "SIEM); csv and ocsf also carry records.jsonl, which is what verification runs on")] = "jsonl",
    proofs: Annotated[str, typer.Option(
        "--proofs", help="ends: tlog-proof files for the first and last record; all: one per record "
        "(LARGE: about 3 KB of tar and 0.2 ms per record; for short periods)")] = "ends",
    as_json: JsonOpt = False,
) -> None:
    """Export one tenant's records for a period as a signed tar with the checkpoint and proofs."""
    if fmt not in FORMAT_FILES or proofs not in PROOF_MODES:
        Console(stderr=True).print(f"audit export: expected --format {'|'.join(FORMAT_FILES)} and --proofs "
                                   f"{'|'.join(PROOF_MODES)}, found {fmt!r} and {proofs!r}", markup=False)
        raise typer.Exit(EXIT_ERROR)
    raise typer.Exit(run_export(db, key=key, tenant=tenant, since=since, until=until, out=out,
                                overwrite=overwrite, fmt=fmt, proofs=proofs, as_json=as_json))


@app.command("verify-export")
def verify_export_cmd(
    path: Annotated[Path, typer.Argument(help="Export tar (or its extracted directory)")],
    public_key: Annotated[Path, typer.Option("--public-key", help="Audit public key PEM")],
    db: Annotated[str | None, typer.Option("--db", help="Record this verification in this appliance's log "
                                                          "(with --key); offline: leave out")] = None,
    key: Annotated[Path | None, typer.Option("--key", help="Audit signing key, with --db")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Verify an export offline with only the export and the public key; exit 0 or 1."""
    raise typer.Exit(run_verify_export(path, public_key=public_key, as_json=as_json, db=db, key=key))


@app.command("public-key")
def public_key_cmd(key: KeyOpt, out: Annotated[Path, typer.Option("--out", help="PEM file to write")]) -> None:
    """Write the audit public key for compliance officers."""
    raise typer.Exit(run_public_key(key=key, out=out))


@app.command("checkpoint")
def checkpoint_cmd(db: DbOpt, key: KeyOpt, as_json: JsonOpt = False) -> None:
    """Sign every stream's head now."""
    raise typer.Exit(run_checkpoint(db, key=key, as_json=as_json))


@app.command("prove")
def prove_cmd(
    db: DbOpt, key: KeyOpt,
    tenant: Annotated[str | None, typer.Option("--tenant", help="Stream of the record ('_admin' for admin events)")]
    = None,
    seq: Annotated[int | None, typer.Option("--seq", help="The record's seq in its stream")] = None,
    gidx: Annotated[int | None, typer.Option("--gidx", help="Instead: the record's position in the "
                                                              "appliance-wide tree _all")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the .tlog-proof here (else print it)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """A C2SP tlog-proof that one record is in the newest signed checkpoint (verified before output)."""
    raise typer.Exit(run_prove(db, key=key, tenant=tenant, seq=seq, gidx=gidx, out=out, as_json=as_json))


@app.command("verify-proof")
def verify_proof_cmd(
    path: Annotated[Path, typer.Argument(help="A .tlog-proof file")],
    public_key: Annotated[Path, typer.Option("--public-key", help="Audit public key PEM")],
    tree: Annotated[str | None, typer.Option("--tree", help="Require a proof for this stream (or _all)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Verify a tlog-proof offline: its record, inclusion path and signed checkpoint; exit 0 or 1."""
    raise typer.Exit(run_verify_proof(path, public_key=public_key, tree=tree, as_json=as_json))


@app.command("consistency")
def consistency_cmd(
    old: Annotated[str, typer.Argument(help="Older checkpoint: a signed-note file, or a tree size")],
    new: Annotated[str, typer.Argument(help="Newer checkpoint: a signed-note file, or a tree size")],
    db: Annotated[str | None, typer.Option("--db", help="Database URL (to compute the proof, or for sizes)")] = None,
    key: Annotated[Path | None, typer.Option("--key", help="Audit signing key file")] = None,
    public_key: Annotated[Path | None, typer.Option("--public-key", help="Audit public key PEM")] = None,
    tree: Annotated[str | None, typer.Option("--tree", help="Tree of the sizes: a stream or _all")] = None,
    proof: Annotated[Path | None, typer.Option("--proof", help="Verify this saved proof (no --db needed)")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the verified proof here")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The consistency proof between two checkpoints of one tree, printed and verified; exit 0, 1 or 2."""
    raise typer.Exit(run_consistency(old, new, db=db, key=key, public_key=public_key, tree=tree, proof_file=proof,
                                     out=out, as_json=as_json))


# -- Commands of other audit modules ------------------------------------------------------------
# One line each (import at the top with the other audit imports). Keep this block last.
register_witness(app)  # witness keygen/log-key/serve, verify-anchors (witness_cli.py)
app.add_typer(retention_app)  # prune, hold, shred, show-content, at this level (retention_cli.py)
