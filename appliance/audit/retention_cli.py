"""``appliance audit prune|hold|shred|show-content``: retention, legal holds, crypto-shredding.

Run on the appliance host with the install root (holding it is the trust anchor, as for
``appliance tenants``): the audit database, signing key, secrets and policies are found from
``ROOT/current/appliance.yaml``. Every change, and every viewing of sealed content, is an audit
event on ``_admin`` with actor ``cli:<os user>``. Exit codes: 0 done, 1 refused for a reason
the message gives (content shredded, hold not active, another prune at work), 2 the command
could not run.
"""

from __future__ import annotations

import getpass
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from appliance.audit.content import MASTER_KEY_FILE, ContentError, ContentSealer, ContentShreddedError
from appliance.audit.errors import AuditError
from appliance.audit.holds import HoldReleasedError, HoldStore
from appliance.audit.log import AuditLog
from appliance.audit.record import ADMIN_STREAM, AuditRecord
from appliance.audit.retention import Pruner
from appliance.audit.schema import audit_events

EXIT_OK, EXIT_REFUSED, EXIT_ERROR = 0, 1, 2

retention_app = typer.Typer(no_args_is_help=True)
hold_app = typer.Typer(help="Legal holds: records that retention must not prune.", no_args_is_help=True)
retention_app.add_typer(hold_app, name="hold")

RootOpt = Annotated[Path, typer.Option("--root", help="Install root of the appliance.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
TenantOpt = Annotated[str, typer.Option("--tenant", help="Tenant (its audit stream).")]


def cli_actor() -> str:
    return f"cli:{getpass.getuser()}"


@dataclass
class _Opened:
    root: Path
    log: AuditLog
    secrets_dir: Path
    policies_dir: Path


@contextmanager
def _open(root: Path) -> Iterator[_Opened]:
    from appliance.config import load_config

    config = load_config(root)
    log = AuditLog(config.db_url, config.audit_key_path, create=False)
    try:
        yield _Opened(root, log, config.secrets_dir, config.policies_dir)
    finally:
        log.close()


def _stderr() -> Console:
    return Console(stderr=True, soft_wrap=True)  # a message stays on one line for scripts


def _print(console: Console, as_json: bool, obj: Any, human: Any) -> None:
    if as_json:
        console.out(json.dumps(obj, indent=2, sort_keys=True), highlight=False)
    else:
        console.print(human, highlight=False, markup=False, soft_wrap=isinstance(human, str))


def _error(err: Console, what: str, exc: Exception) -> int:
    # a database error's text may quote statement parameters (wrapped keys): its type only
    text = f"database error {type(exc).__name__}" if isinstance(exc, SQLAlchemyError) else str(exc)
    err.print(f"audit {what}: {text}", markup=False, highlight=False)
    return EXIT_REFUSED if isinstance(exc, ContentShreddedError | HoldReleasedError) else EXIT_ERROR


def run_prune(root: Path, *, dry_run: bool = False, as_json: bool = False, console: Console | None = None) -> int:
    out, err = console or Console(), _stderr()
    try:
        from appliance.config import load_config
        from policies.effective import applied_policy_dir, load_in_force

        with _open(root) as opened:  # the set in force: the release's files with the applied ones laid over
            policies = load_in_force(opened.policies_dir, applied_policy_dir(load_config(root).data_dir))
            report = Pruner(opened.log, policies, actor=cli_actor()).run_once(dry_run=dry_run)
    except (AuditError, OSError, ValueError, SQLAlchemyError) as exc:
        return _error(err, "prune", exc)
    if report.skipped is not None:
        if as_json:
            _print(out, True, report.to_dict(), "")
        err.print(f"audit prune: nothing done: {report.skipped}", markup=False, highlight=False)
        return EXIT_REFUSED
    table = Table(title=f"{'Would prune' if dry_run else 'Pruned'} {report.pruned} records (now {report.now})")
    for column in ("Tenant", "Keep days", "Cutoff", "Records", "Seqs", "Held", "Complete"):
        table.add_column(column)
    for t in report.tenants:
        seqs = "-" if t.first_seq is None else f"{t.first_seq}..{t.last_seq}"
        table.add_row(t.tenant, str(t.audit_days), t.cutoff, str(t.count), seqs, str(t.held),
                      "yes" if t.complete else "no (run again)")
    _print(out, as_json, report.to_dict(), table)
    return EXIT_OK


def run_hold_add(root: Path, *, tenant: str, reason: str, since: str | None = None, until: str | None = None,
                 as_json: bool = False, console: Console | None = None) -> int:
    out, err = console or Console(), _stderr()
    try:
        with _open(root) as opened:
            hold = HoldStore(opened.log).add(tenant, reason=reason, since=since, until=until, actor=cli_actor())
    except (AuditError, OSError, ValueError, SQLAlchemyError) as exc:
        return _error(err, "hold add", exc)
    _print(out, as_json, hold.to_dict(), f"added {hold.describe()}")
    return EXIT_OK


def run_hold_list(root: Path, *, tenant: str | None = None, include_released: bool = False,
                  as_json: bool = False, console: Console | None = None) -> int:
    out, err = console or Console(), _stderr()
    try:
        with _open(root) as opened:
            holds = HoldStore(opened.log).list(tenant, include_released=include_released)
    except (AuditError, OSError, ValueError, SQLAlchemyError) as exc:
        return _error(err, "hold list", exc)
    table = Table(title=f"Legal holds ({len(holds)})")
    for column in ("Id", "Tenant", "Since", "Until", "Reason", "Added", "Released"):
        table.add_column(column, no_wrap=column == "Id")
    for h in holds:
        released = "-" if h.released_at is None else f"{_short(h.released_at)} {h.released_by}"
        table.add_row(h.id, h.tenant, _short(h.since), _short(h.until), h.reason,
                      f"{_short(h.created_at)} {h.created_by}", released)
    _print(out, as_json, [h.to_dict() for h in holds], table)
    return EXIT_OK


def _short(ts: str | None) -> str:
    """A stored time to the second, for tables (``--json`` keeps the exact value)."""
    return "-" if ts is None else ts[:19] + "Z"


def run_hold_release(root: Path, hold_id: str, *, as_json: bool = False, console: Console | None = None) -> int:
    out, err = console or Console(), _stderr()
    try:
        with _open(root) as opened:
            hold = HoldStore(opened.log).release(hold_id, actor=cli_actor())
    except (AuditError, OSError, ValueError, SQLAlchemyError) as exc:
        return _error(err, "hold release", exc)
    _print(out, as_json, hold.to_dict(), f"released {hold.describe()}")
    return EXIT_OK


def run_shred(root: Path, *, tenant: str, yes: bool, as_json: bool = False, console: Console | None = None) -> int:
    out, err = console or Console(), _stderr()
    if not yes:
        err.print(f"audit shred: destroys tenant {tenant!r}'s data keys, making its stored content unreadable for "
                  "good; expected --yes to confirm, found none", markup=False, highlight=False)
        return EXIT_ERROR
    try:
        with _open(root) as opened:
            sealer = ContentSealer(opened.log, opened.secrets_dir / MASTER_KEY_FILE, create=False)
            result = sealer.shred(tenant, actor=cli_actor())
    except (AuditError, OSError, ValueError, SQLAlchemyError) as exc:
        return _error(err, "shred", exc)
    _print(out, as_json, {"tenant": result.tenant, "key_ids": result.key_ids, "shredded_at": result.shredded_at},
           f"destroyed {len(result.key_ids)} data key(s) of tenant {tenant!r} at {result.shredded_at}")
    return EXIT_OK


def run_show_content(root: Path, *, tenant: str, request_id: str, as_json: bool = False,
                     console: Console | None = None) -> int:
    out, err = console or Console(), _stderr()
    try:
        with _open(root) as opened:
            shown = _open_content(opened, tenant, request_id)
    except (AuditError, OSError, ValueError, SQLAlchemyError) as exc:
        return _error(err, "show-content", exc)
    _print(out, as_json, shown, "\n".join(f"seq {s['seq']} ({s['event_type']}):\n{s['content']}" for s in shown))
    return EXIT_OK


def _open_content(opened: _Opened, tenant: str, request_id: str) -> list[dict[str, Any]]:
    ev = audit_events.c
    with opened.log.engine.connect() as conn:
        rows = conn.execute(select(audit_events).where(ev.stream == tenant, ev.request_id == request_id)
                            .order_by(ev.seq)).all()
    records = [AuditRecord.from_row(row) for row in rows]
    sealed = [r for r in records if "content" in r.data]
    if not sealed:
        found = "no record" if not records else f"{len(records)} record(s) without stored content (pruned, or " \
            "not stored by policy)"
        raise ContentError(f"expected a record of tenant {tenant!r}, request {request_id!r} with sealed content, "
                           f"found {found}")
    sealer = ContentSealer(opened.log, opened.secrets_dir / MASTER_KEY_FILE, create=False)
    # recorded before anything is shown, whether it can be opened or not
    opened.log.append("admin.audit_content_viewed", stream=ADMIN_STREAM, actor=cli_actor(), tenant=tenant,
                      request_id=request_id, data={"seqs": [r.seq for r in sealed]})
    return [{"seq": r.seq, "event_type": r.event_type, "content": sealer.open(tenant, request_id, r.data["content"])}
            for r in sealed]


@retention_app.command("prune")
def prune_cmd(root: RootOpt = Path("var"),
              dry_run: Annotated[bool, typer.Option("--dry-run", help="Only report what would be pruned.")] = False,
              as_json: JsonOpt = False) -> None:
    """Prune the bodies of tenant records older than the retention policy keeps (legal holds respected)."""
    raise typer.Exit(run_prune(root, dry_run=dry_run, as_json=as_json))


@hold_app.command("add")
def hold_add_cmd(tenant: TenantOpt, reason: Annotated[str, typer.Option("--reason", help="Why (case, order).")],
                 root: RootOpt = Path("var"),
                 since: Annotated[str | None, typer.Option("--since", help="Start, RFC 3339, inclusive")] = None,
                 until: Annotated[str | None, typer.Option("--until", help="End, RFC 3339, exclusive")] = None,
                 as_json: JsonOpt = False) -> None:
    """Put a tenant's records (all, or those of a period) under legal hold."""
    raise typer.Exit(run_hold_add(root, tenant=tenant, reason=reason, since=since, until=until, as_json=as_json))


@hold_app.command("list")
def hold_list_cmd(root: RootOpt = Path("var"),
                  tenant: Annotated[str | None, typer.Option("--tenant", help="Only this tenant.")] = None,
                  include_released: Annotated[bool, typer.Option("--all", help="Include released holds.")] = False,
                  as_json: JsonOpt = False) -> None:
    """List legal holds in force (--all: released ones too)."""
    raise typer.Exit(run_hold_list(root, tenant=tenant, include_released=include_released, as_json=as_json))


@hold_app.command("release")
def hold_release_cmd(hold_id: Annotated[str, typer.Argument(help="Hold id (see hold list).")],
                     root: RootOpt = Path("var"), as_json: JsonOpt = False) -> None:
    """Release a legal hold; its records become prunable again."""
    raise typer.Exit(run_hold_release(root, hold_id, as_json=as_json))


@retention_app.command("shred")
def shred_cmd(tenant: TenantOpt, root: RootOpt = Path("var"),
              yes: Annotated[bool, typer.Option("--yes", help="Confirm: this cannot be undone.")] = False,
              as_json: JsonOpt = False) -> None:
    """Destroy a tenant's data keys: its stored content becomes unreadable; the log still verifies."""
    raise typer.Exit(run_shred(root, tenant=tenant, yes=yes, as_json=as_json))


@retention_app.command("show-content")
def show_content_cmd(tenant: TenantOpt,
                     request_id: Annotated[str, typer.Option("--request-id", help="Request id of the record.")],
                     root: RootOpt = Path("var"), as_json: JsonOpt = False) -> None:
    """Decrypt and show a request's stored content (admins on the host only; audited)."""
    raise typer.Exit(run_show_content(root, tenant=tenant, request_id=request_id, as_json=as_json))
