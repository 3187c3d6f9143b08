"""``appliance audit witness ...`` and ``appliance audit verify-anchors``.

``witness keygen`` makes a witness key and prints its verifier key; ``witness log-key`` prints the
appliance's log verifier key (what a witness is configured with); ``witness serve`` runs the
witness (c2sp.org/tlog-witness). ``verify-anchors`` verifies the database and then checks it
against anchors held off the box (see ``anchor_verify``). Exit codes: 0 passed, 1 a check
failed, 2 the command could not run.

Mounted on the audit CLI with ``register(app)``; ``python -m appliance.audit.witness_cli`` runs the
same commands stand-alone.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine

from appliance.audit.anchor_verify import verify_anchors
from appliance.audit.checkpoint import GLOBAL_TREE, log_verifier, origin_of
from appliance.audit.checkpointing import stream_names
from appliance.audit.db_verify import verify_database
from appliance.audit.errors import AuditError
from appliance.audit.keys import AuditKeys, public_key_from_pem
from appliance.audit.note import SIG_ED25519, NoteError
from appliance.audit.schema import make_engine
from appliance.audit.witness import (
    WitnessError,
    WitnessState,
    generate_witness_key,
    load_witness_key,
    parse_vkey,
)
from appliance.audit.witness_client import WitnessClient
from appliance.audit.witness_server import DEFAULT_MAX_BODY, WitnessServer, server_tls_context

EXIT_OK, EXIT_FAILED, EXIT_ERROR = 0, 1, 2

witness_app = typer.Typer(help="Run a witness that cosigns audit checkpoints (C2SP tlog-witness).",
                          no_args_is_help=True)


def _public_key(key: Path | None, public_key: Path | None) -> Any:
    if key is not None:
        return AuditKeys(key, create=False).public_key
    if public_key is not None:
        return public_key_from_pem(Path(public_key).read_bytes())
    raise AuditError("expected --key or --public-key, found neither")


def fetch_witness_checkpoints(engine: Engine, public_key: Any, clients: list[WitnessClient]) -> list[tuple[str, str]]:
    """What each witness holds for this log's trees (``_all`` and every stream), as (where, note)."""
    with engine.connect() as conn, conn.begin():
        trees = [GLOBAL_TREE, *stream_names(conn, include_checkpointed=True)]
    notes = []
    for client in clients:
        for tree in trees:
            note = client.fetch_checkpoint(origin_of(public_key, tree))
            if note is not None:
                notes.append((f"witness {client.name} at {client.url}, tree {tree}", note.text()))
    return notes


def run_verify_anchors(db: str, *, key: Path | None = None, public_key: Path | None = None,
                       anchors: list[Path] | None = None, witness_keys: list[str] | None = None,
                       witness_urls: list[str] | None = None, witness_ca: Path | None = None,
                       witness_client_cert: Path | None = None, witness_client_key: Path | None = None,
                       require_witness: bool = False, as_json: bool = False, console: Console | None = None) -> int:
    """Verify the database, then check it against ``anchors``, witness cosignatures and what each
    witness at ``witness_urls`` holds (the i-th URL is the witness of the i-th key)."""
    out, err = console or Console(), Console(stderr=True)
    keys_given, urls = witness_keys or [], witness_urls or []
    if len(urls) > len(keys_given):
        err.print(f"audit verify-anchors: expected a --witness-key for each --witness-url, found {len(urls)} urls "
                  f"and {len(keys_given)} keys", markup=False)
        return EXIT_ERROR
    try:
        pub = _public_key(key, public_key)
        engine = make_engine(db, create=False)
        chains = verify_database(engine, pub)
        clients = [WitnessClient(url, vkey, ca=witness_ca, client_cert=witness_client_cert,
                                 client_key=witness_client_key) for url, vkey in zip(urls, keys_given, strict=False)]
        fetched = fetch_witness_checkpoints(engine, pub, clients)
        report = verify_anchors(engine, pub, anchors or [], witness_keys=keys_given,
                                require_witness=require_witness, extra_notes=fetched)
    except (AuditError, OSError, ValueError) as exc:
        err.print(f"audit verify-anchors: {exc}", markup=False)
        return EXIT_ERROR
    ok = chains.ok and report.ok
    if key is not None:  # with the signing key the verification is itself recorded, as `audit verify` does
        _record(db, key, report.anchors_checked, len(report.witnesses),
                "ok" if ok else ("failed: " + (report.failures[0].describe() if report.failures
                                               else "database checks")[:200]), err)
    if as_json:
        out.out(json.dumps({"ok": ok, "database": chains.to_dict(), "anchors": report.to_dict()}, indent=2,
                           sort_keys=True), highlight=False)
        return EXIT_OK if ok else EXIT_FAILED
    first = chains.first_failure
    out.print(f"database: {chains.records_checked} records in {chains.streams_checked} streams: "
              + ("ok" if first is None else f"FAILED: {first.describe()}"), markup=False)
    table = Table(title=f"Anchors ({report.anchors_checked} checkpoints held off the box)")
    for column in ("Tree", "Anchored checkpoints", "Newest anchored size", "Database size", "Result"):
        table.add_column(column)
    for t in report.trees:
        table.add_row(t.tree, str(t.anchors), str(t.newest_anchored), str(t.database_size),
                      "[green]ok[/]" if t.ok else "[red]FAILED[/]")
    out.print(table)
    for w in report.witnesses:
        out.print(f"witness {w.witness}: " + ("no cosigned checkpoint" if w.newest_size is None else
                  f"newest cosigned size {w.newest_size} at unix time {w.cosigned_at}, "
                  f"{w.records_after} records after it"), markup=False)
    for s in report.skipped:
        out.print(f"skipped (another log): {s}", markup=False)
    for f in report.failures:
        out.print(f"FAILED {f.describe()}", markup=False)
    out.print("[green]VERIFIED against anchors[/]" if ok else "[red]NOT VERIFIED[/]")
    return EXIT_OK if ok else EXIT_FAILED


def _record(db: str, key: Path, anchors: int, witnesses: int, result: str, err: Console) -> None:
    from appliance.audit.cli import record_admin_event  # here: the audit CLI imports this module
    from appliance.audit.log import AuditLog

    try:
        log = AuditLog(db, key, create=False)
    except (AuditError, OSError, ValueError) as exc:
        err.print(f"warning: could not record admin.audit_verified in the audit log: {exc}", markup=False)
        return
    try:
        record_admin_event(log, "admin.audit_verified", None,
                           {"what": "anchors", "anchors": anchors, "witnesses": witnesses, "result": result}, err)
    finally:
        log.close()


@witness_app.command("keygen")
def keygen_cmd(
    out: Annotated[Path, typer.Option("--out", help="Witness key file to create (0600)")],
    name: Annotated[str, typer.Option("--name", help="Witness name (no spaces or '+')")] = "sovereign-witness",
) -> None:
    """Create a witness key; prints its verifier key (give it to the appliance as audit.witness_key)."""
    try:
        verifier = generate_witness_key(out, name)
    except (WitnessError, NoteError, OSError) as exc:
        _fail(f"witness keygen: {exc}")
    print(verifier.text())


@witness_app.command("log-key")
def log_key_cmd(
    key: Annotated[Path | None, typer.Option("--key", help="Audit signing key file")] = None,
    public_key: Annotated[Path | None, typer.Option("--public-key", help="Audit public key PEM")] = None,
) -> None:
    """Print the appliance's log verifier key (give it to the witness as --log)."""
    try:
        print(log_verifier(_public_key(key, public_key)).text())
    except (AuditError, OSError) as exc:
        _fail(f"witness log-key: {exc}")


@witness_app.command("serve")
def serve_cmd(
    key: Annotated[Path, typer.Option("--key", help="Witness key file (from keygen)")],
    state: Annotated[Path, typer.Option("--state", help="State directory (keep it: it is the witness's memory)")],
    logs: Annotated[list[str], typer.Option("--log", help="Log verifier key to witness (repeatable)")],
    listen: Annotated[str, typer.Option("--listen", help="HOST:PORT (port 0: any free port)")] = "127.0.0.1:7380",
    tls_cert: Annotated[Path | None, typer.Option("--tls-cert", help="Server certificate (PEM)")] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="Server certificate key (PEM)")] = None,
    client_ca: Annotated[Path | None, typer.Option("--client-ca", help="Require client certificates from this CA")]
    = None,
    max_body: Annotated[int, typer.Option("--max-body", help="Largest request body, bytes")] = DEFAULT_MAX_BODY,
) -> None:
    """Serve POST /add-checkpoint until interrupted (SIGINT or SIGTERM)."""
    host, _, port_text = listen.rpartition(":")
    if not host or not port_text.isdigit() or int(port_text) > 65535:
        _fail(f"witness serve: --listen expected HOST:PORT, found {listen!r}")
    if (tls_cert is None) != (tls_key is None) or (client_ca is not None and tls_cert is None):
        _fail("witness serve: expected --tls-cert with --tls-key (and --client-ca only with them)")
    try:
        verifiers = [parse_vkey(text) for text in logs]
        if any(v.sig_type != SIG_ED25519 for v in verifiers):
            raise WitnessError("--log expects log verifier keys (type 0x01, from `witness log-key`)")
        signer = load_witness_key(key)
        witness_state = WitnessState(state, verifiers, signer)
        tls = None if tls_cert is None or tls_key is None else server_tls_context(tls_cert, tls_key, client_ca)
        server = WitnessServer((host.strip("[]"), int(port_text)), witness_state, tls=tls, max_body=max_body)
    except (WitnessError, NoteError, OSError) as exc:
        _fail(f"witness serve: {exc}")
    bound_host, bound_port = server.server_address[:2]
    scheme = "https" if tls is not None else "http"
    print(f"witness {signer.verifier.text()} listening on {scheme}://{bound_host!s}:{bound_port}", flush=True)

    def _stop(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        witness_state.close()


def verify_anchors_cmd(
    db: Annotated[str, typer.Option("--db", help="Database URL, e.g. sqlite:////var/lib/appliance/audit.db")],
    anchor: Annotated[list[Path] | None, typer.Option(
        "--anchor", help="Publish dir, witness state dir or directory of checkpoint files (repeatable)")] = None,
    witness_key: Annotated[list[str] | None, typer.Option(
        "--witness-key", help="Witness verifier key whose cosignatures count (repeatable)")] = None,
    require_witness: Annotated[bool, typer.Option(
        "--require-witness", help="Fail unless each witness cosigned a checkpoint of this log")] = False,
    witness_url: Annotated[list[str] | None, typer.Option(
        "--witness-url", help="Ask this witness (of the --witness-key at the same position) what it holds")] = None,
    witness_ca: Annotated[Path | None, typer.Option("--witness-ca", help="CA of the witnesses' TLS")] = None,
    witness_client_cert: Annotated[Path | None, typer.Option(
        "--witness-client-cert", help="Client certificate for witnesses with mutual TLS")] = None,
    witness_client_key: Annotated[Path | None, typer.Option(
        "--witness-client-key", help="Its key")] = None,
    key: Annotated[Path | None, typer.Option("--key", help="Audit signing key file")] = None,
    public_key: Annotated[Path | None, typer.Option("--public-key", help="Audit public key PEM")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Verify the log, then against checkpoints held off the box; exit 1 on any failure."""
    raise typer.Exit(run_verify_anchors(
        db, key=key, public_key=public_key, anchors=anchor, witness_keys=witness_key, witness_urls=witness_url,
        witness_ca=witness_ca, witness_client_cert=witness_client_cert, witness_client_key=witness_client_key,
        require_witness=require_witness, as_json=as_json))


def _fail(message: str) -> NoReturn:
    Console(stderr=True).print(message, markup=False)
    raise typer.Exit(EXIT_ERROR)


def register(app: typer.Typer) -> None:
    """Mount ``witness`` and ``verify-anchors`` on the audit CLI."""
    app.add_typer(witness_app, name="witness")
    app.command("verify-anchors")(verify_anchors_cmd)


standalone = typer.Typer(no_args_is_help=True, help="Audit anchors: witness and verification against anchors.")
register(standalone)

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    standalone()
