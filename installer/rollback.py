"""rollback: re-check an installed release against its recorded hashes and put it back in
service (node by node: stop, switch `current`, start, HTTPS health check; a node whose target
fails is put back as it was). No bundle is needed; the trusted state is left as it is (its
versions never go backwards), so an older bundle cannot be re-installed over a newer trusted
state."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from installer.ansible_runner import run_playbook
from installer.display import playbook_progress
from installer.errors import InputError, NotInstalledError
from installer.install import InstallResult, resolve_inventory
from installer.interrupted import tracked_run
from installer.inventory import Inventory
from installer.journal import JournalEntry, journal_action
from installer.layout import RootLayout
from installer.service import playbook_error, service_notes, service_timeout, service_vars, start_seconds
from installer.staging import installer_lock, run_dir
from installer.versions import (
    fleet_releases,
    installed_versions,
    read_release_config,
    record_fleet_release,
    version_key,
)


def rollback_target(layout: RootLayout, current: str) -> str:
    """The release current pointed at before the last switch, else the newest older one (for a
    fleet whose nodes have their own roots: as the installer's fleet record says)."""
    installed = installed_versions(layout) or sorted(fleet_releases(layout), key=version_key)
    try:
        record = layout.switch_record if layout.switch_record.is_file() else layout.fleet_record
        previous = json.loads(record.read_text()).get("previous", "")
    except (OSError, ValueError, AttributeError):
        previous = ""
    if previous and previous != current and previous in installed:
        return str(previous)
    older = [v for v in installed if version_key(v) < version_key(current)]
    if not older:
        raise NotInstalledError(f"{layout.releases}: expected a release older than {current} to roll back to, "
                                f"found {installed or 'none'}")
    return older[-1]


def rollback(
    root: Path,
    to: str | None = None,
    inventory: Path | str | Inventory | None = None,
    *,
    console: Console | None = None,
    start: bool = False,
    timeout_s: float | None = None,
) -> InstallResult:
    """Switch ``current`` to release ``to`` (default: the previous one) after re-checking its
    files; with ``start=True`` (the CLI's default) restart the appliance on it and check its health."""
    layout = RootLayout(root)
    inv = resolve_inventory(inventory)
    current = layout.current_version()
    if current is None:
        raise NotInstalledError(f"{layout.root}: expected an installed release, found no current symlink")
    target = to or rollback_target(layout, current)
    if "/" in target or target in ("", ".", ".."):
        raise InputError(f"--to: expected a release version, found {target!r}")
    remote = not inv.installs_into(layout.root)  # the nodes' roots are elsewhere: the fleet record knows
    config = read_release_config(layout.release(target)) or (fleet_releases(layout).get(target) if remote else None)
    if config is None:
        raise NotInstalledError(f"release {target}: expected {layout.release(target)}/appliance.yaml, found none; "
                                f"installed: {installed_versions(layout) or 'none'}")
    if target == current:
        raise InputError(f"--to: expected a release other than the current {current}, found {target}")
    digest = str(config.get("bundle_digest", ""))

    def journal(result: str, detail: str) -> None:
        journal_action(layout, JournalEntry("rollback", result, target, digest, inv.names, detail), create=True)

    with installer_lock(layout), tracked_run(layout, "rollback", target, digest, inv.names) as notes, \
            run_dir(layout) as work:
        extra_vars = {"sovereign_version": target,
                      "sovereign_bundle_digest": digest, **service_vars(inv, start=start)}
        with playbook_progress(console, f"rollback to {target}") as on_event:
            result = run_playbook("rollback.yml", inventory=inv.to_ansible(work / "remote-tmp", layout.root),
                                  extra_vars=extra_vars, work_dir=work / "ansible", on_event=on_event,
                                  timeout_s=timeout_s or service_timeout(inv))
        if not result.ok:
            error = playbook_error(result)
            journal("failed", str(error))
            raise error
        if remote:
            record_fleet_release(layout, target, digest, str(config.get("model", "")), inv.names)
        running = "; appliance running and healthy" if start else ""
        journal("ok", f"switched current from {current} to {target}{running}")
    return InstallResult(action="rollback", version=target, bundle_digest=digest, root=layout.root,
                         release_dir=layout.release(target), nodes=inv.names, changed=result.changed,
                         switched=True, previous=current, playbook=result, notes=notes + service_notes(result),
                         timings={"service_start": round(start_seconds(result), 3),
                                  "playbook": round(result.wall_s, 3)}, started=start)
