"""``appliance tenants|keys|admins``: identity and access on the appliance host.

Run where the install root is (holding it is the trust anchor: these commands need no admin key).
Every change is an audit event on the ``_admin`` stream with actor ``cli:<os user>``. ``--json``
prints one JSON document for scripts. Exit codes: 0 done, 2 refused (bad input, unknown name,
missing install root).
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from appliance.apikeys import IssuedKey, KeyInfo, parse_duration, parse_expiry
from appliance.audit import AuditLog
from appliance.errors import ConfigError, TenancyError
from appliance.tenancy import TenantStore

tenants_app = typer.Typer(help="Manage tenants and their model grants.", no_args_is_help=True)
keys_app = typer.Typer(help="Manage API keys (tenant and admin keys).", no_args_is_help=True)
admins_app = typer.Typer(help="Manage named admins.", no_args_is_help=True)
console = Console()
err = Console(stderr=True, soft_wrap=True)  # messages stay on one line for scripts

RootOpt = Annotated[Path, typer.Option("--root", help="Install root of the appliance.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
ModelsOpt = Annotated[str | None, typer.Option(
    "--models", help="Model grants: comma-separated names or glob patterns, e.g. 'SmolLM2-*,llama-3*'; '' for none.")]


def _fail(exc: Exception, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
    return typer.Exit(code)


def _open(root: Path) -> tuple[TenantStore, AuditLog]:
    from appliance.config import load_config
    from appliance.db import open_database

    config = load_config(root)
    return TenantStore(open_database(config.db_url)), AuditLog(config.db_url, config.audit_key_path)


def _actor() -> str:
    return f"cli:{getpass.getuser()}"


def _audit(audit: AuditLog, event: str, data: dict[str, Any], tenant: str | None = None) -> None:
    audit.append(f"admin.{event}", stream="_admin", actor=_actor(), tenant=tenant, data=data)


def _models(text: str | None) -> list[str] | None:
    return None if text is None else [m for m in text.split(",") if m.strip()]


def _out(as_json: bool, obj: Any, human: str | Table) -> None:
    if as_json:
        print(json.dumps(obj, indent=2, sort_keys=True))
    else:
        console.print(human)


def _issued(issued: IssuedKey, as_json: bool) -> None:
    """The key is printed once, alone on stdout in text mode so that scripts can capture it."""
    if as_json:
        print(json.dumps({"key_id": issued.key_id, "owner": issued.owner, "owner_kind": issued.owner_kind,
                          "scopes": list(issued.scopes), "expires_at": issued.expires_at, "key": issued.secret}))
    else:
        err.print(f"key {issued.key_id} for {issued.owner_kind} {issued.owner} (scopes {', '.join(issued.scopes)}"
                  f"{', expires ' + issued.expires_at if issued.expires_at else ''}); it is shown only now:",
                  highlight=False)
        print(issued.secret)


# -- tenants --------------------------------------------------------------------------------


@tenants_app.command("create")
def tenants_create(name: str, root: RootOpt = Path("var"), models: ModelsOpt = None, as_json: JsonOpt = False) -> None:
    """Create a tenant (no model until one is granted with --models, unless the policy allows it)."""
    try:
        store, audit = _open(root)
        tenant = store.create_tenant(name, _models(models) or [])
    except (TenancyError, ConfigError) as exc:
        raise _fail(exc) from None
    _audit(audit, "tenant_created", {"tenant": name, "models": list(tenant.models)}, name)
    _out(as_json, tenant.to_dict(), f"created tenant {tenant.name}" +
         (f" with models {', '.join(tenant.models)}" if tenant.models else " (no model granted)"))


@tenants_app.command("update")
def tenants_update(name: str, root: RootOpt = Path("var"), models: ModelsOpt = None,
                   enable: Annotated[bool, typer.Option("--enable", help="Enable a disabled tenant.")] = False,
                   as_json: JsonOpt = False) -> None:
    """Change a tenant's model grants (replacing them) or enable it again."""
    try:
        store, audit = _open(root)
        tenant = store.update_tenant(name, models=_models(models), disabled=False if enable else None)
    except (TenancyError, ConfigError) as exc:
        raise _fail(exc) from None
    _audit(audit, "tenant_updated", {"tenant": name, "models": list(tenant.models), "disabled": tenant.disabled}, name)
    _out(as_json, tenant.to_dict(), f"updated tenant {name}: models {', '.join(tenant.models) or 'none'}, "
         f"{'disabled' if tenant.disabled else 'enabled'}")


@tenants_app.command("disable")
def tenants_disable(name: str, root: RootOpt = Path("var"), as_json: JsonOpt = False) -> None:
    """Disable a tenant: its keys get 403 tenant_disabled until `tenants update NAME --enable`."""
    try:
        store, audit = _open(root)
        tenant = store.update_tenant(name, disabled=True)
    except (TenancyError, ConfigError) as exc:
        raise _fail(exc) from None
    _audit(audit, "tenant_updated", {"tenant": name, "disabled": True}, name)
    _out(as_json, tenant.to_dict(), f"disabled tenant {name}")


@tenants_app.command("delete")
def tenants_delete(name: str, root: RootOpt = Path("var"),
                   yes: Annotated[bool, typer.Option("--yes", help="Confirm: this revokes every key.")] = False,
                   as_json: JsonOpt = False) -> None:
    """Delete a tenant: revokes all its keys; its audit records stay and its name is never reused."""
    if not yes:
        raise _fail(TenancyError(f"deleting tenant {name!r} revokes all its keys: expected --yes to confirm"))
    try:
        store, audit = _open(root)
        revoked = store.delete_tenant(name)
    except (TenancyError, ConfigError) as exc:
        raise _fail(exc) from None
    _audit(audit, "tenant_deleted", {"tenant": name, "revoked_key_ids": revoked}, name)
    _out(as_json, {"tenant": name, "deleted": True, "revoked_key_ids": revoked},
         f"deleted tenant {name}; revoked {len(revoked)} key(s)")


@tenants_app.command("list")
def tenants_list(root: RootOpt = Path("var"), as_json: JsonOpt = False,
                 deleted: Annotated[bool, typer.Option("--deleted", help="Include deleted tenants.")] = False) -> None:
    try:
        store, _ = _open(root)
    except ConfigError as exc:
        raise _fail(exc) from None
    tenants = store.list_tenants(include_deleted=deleted)
    table = Table("tenant", "created", "state", "models")
    for t in tenants:
        state = "deleted" if t.deleted_at else "disabled" if t.disabled else "enabled"
        table.add_row(t.name, t.created_at, state, ", ".join(t.models) or "-")
    _out(as_json, [t.to_dict() for t in tenants], table)


# -- keys -----------------------------------------------------------------------------------


@keys_app.command("issue")
def keys_issue(
    owner: Annotated[str, typer.Argument(help="Tenant name (or admin name with --admin).")],
    root: RootOpt = Path("var"), label: str = "",
    scope: Annotated[list[str] | None, typer.Option(
        "--scope", help="inference (default) and/or audit:read; repeat for several.")] = None,
    expires: Annotated[str | None, typer.Option(help="Expiry: '90d', '12h' or an ISO 8601 time.")] = None,
    admin: Annotated[bool, typer.Option("--admin", help="OWNER is an admin: issue an admin key.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Issue a key; it is printed once and only its hash is stored."""
    try:
        store, audit = _open(root)
        expires_at = parse_expiry(expires)
        if admin:
            issued = store.admins.issue_key(owner, label, expires_at=expires_at, created_by=_actor())
        else:
            issued = store.issue_key(owner, label, scopes=scope or ["inference"], expires_at=expires_at,
                                     created_by=_actor())
    except (TenancyError, ConfigError) as exc:
        raise _fail(exc) from None
    _audit(audit, "key_issued", {"owner": owner, "owner_kind": issued.owner_kind, "key_id": issued.key_id,
                                 "label": label, "scopes": list(issued.scopes), "expires_at": issued.expires_at},
           None if admin else owner)
    _issued(issued, as_json)


@keys_app.command("list")
def keys_list(root: RootOpt = Path("var"), tenant: str | None = None, admin: str | None = None,
              revoked: Annotated[bool, typer.Option("--revoked", help="Include revoked keys.")] = False,
              as_json: JsonOpt = False) -> None:
    """List keys (ids, owners, scopes, expiry, last use; never secrets)."""
    try:
        store, _ = _open(root)
    except ConfigError as exc:
        raise _fail(exc) from None
    keys = store.list_keys(tenant=tenant, admin=admin, include_revoked=revoked)
    table = Table("key id", "owner", "scopes", "state", "expires", "last used", "label")
    for k in keys:
        table.add_row(k.key_id, f"{k.owner_kind}:{k.owner}", ",".join(k.scopes), k.state(), k.expires_at or "-",
                      k.last_used_at or "-", k.label)
    _out(as_json, [k.to_dict() for k in keys], table)


@keys_app.command("revoke")
def keys_revoke(key_id: str, root: RootOpt = Path("var"), as_json: JsonOpt = False) -> None:
    try:
        store, audit = _open(root)
        info: KeyInfo = store.revoke_key(key_id)
    except (TenancyError, ConfigError) as exc:
        raise _fail(exc) from None
    _audit(audit, "key_revoked", {"key_id": key_id, "owner": info.owner, "owner_kind": info.owner_kind},
           info.owner if info.owner_kind == "tenant" else None)
    _out(as_json, info.to_dict(), f"revoked {key_id}")


@keys_app.command("rotate")
def keys_rotate(key_id: str, root: RootOpt = Path("var"),
                grace: Annotated[str | None, typer.Option(
                    help="How long the old key keeps working, e.g. '1h' (default: revoked now).")] = None,
                as_json: JsonOpt = False) -> None:
    """Issue a new key like KEY_ID (owner, scopes, label, expiry) and revoke KEY_ID after --grace."""
    try:
        store, audit = _open(root)
        new, old = store.rotate_key(key_id, grace=parse_duration(grace) if grace else dt.timedelta(0),
                                    created_by=_actor())
    except (TenancyError, ConfigError) as exc:
        raise _fail(exc) from None
    _audit(audit, "key_rotated", {"key_id": key_id, "new_key_id": new.key_id, "owner": new.owner,
                                  "owner_kind": new.owner_kind, "old_revoked_at": old.revoked_at},
           new.owner if new.owner_kind == "tenant" else None)
    err.print(f"{key_id} stops working at {old.revoked_at}", highlight=False)
    _issued(new, as_json)


# -- admins ---------------------------------------------------------------------------------


@admins_app.command("create")
def admins_create(name: str, root: RootOpt = Path("var"), as_json: JsonOpt = False) -> None:
    """Create a named admin and print its admin key once."""
    try:
        store, audit = _open(root)
        issued = store.admins.create_admin(name, _actor())
    except (TenancyError, ConfigError) as exc:
        raise _fail(exc) from None
    _audit(audit, "admin_created", {"admin": name, "key_id": issued.key_id})
    _issued(issued, as_json)


@admins_app.command("list")
def admins_list(root: RootOpt = Path("var"), as_json: JsonOpt = False) -> None:
    try:
        store, _ = _open(root)
    except ConfigError as exc:
        raise _fail(exc) from None
    admins = store.admins.list_admins()
    table = Table("admin", "created", "by", "state")
    for a in admins:
        table.add_row(a.name, a.created_at, a.created_by, "disabled" if a.disabled else "enabled")
    _out(as_json, [a.__dict__ for a in admins], table)


@admins_app.command("disable")
def admins_disable(name: str, root: RootOpt = Path("var"), as_json: JsonOpt = False) -> None:
    """Disable an admin: its keys get 403 admin_disabled."""
    try:
        store, audit = _open(root)
        found = store.admins.set_disabled(name, True)
    except (TenancyError, ConfigError) as exc:
        raise _fail(exc) from None
    _audit(audit, "admin_disabled", {"admin": name})
    _out(as_json, found.__dict__, f"disabled admin {name}")
