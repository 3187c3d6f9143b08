"""Running the appliance on the nodes: start, stop, restart through the `service` playbook.

Where systemd is PID 1 the `service` role renders a unit and drives systemd. Elsewhere
(containers, evaluation machines: "supervisor mode") it installs ROOT/bin/appliancectl on the
node, which starts ``appliance serve --root ROOT --host H --port P`` in its own session (setsid),
appends its output to ROOT/logs/appliance.log, writes ROOT/run/appliance.pid atomically and
waits until HTTPS /health, checked against ROOT/tls/ca.pem only, reports the expected release.
A release whose bundle carried wheels runs on its own runtime, ROOT/runtimes/<id>/bin/appliance
(named in the release's release.json; see installer/runtime.py); the systemd unit runs
``appliancectl exec``, which picks the same. A release without one runs on the node runtime: the
inventory node's ``appliance`` field, else the ``appliance`` next to the node's python (see
InventoryNode.appliance_command).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from installer.ansible_runner import DEFAULT_TIMEOUT_S, PlaybookResult, run_playbook, task_is
from installer.display import playbook_progress
from installer.errors import AnsibleFailed, InputError, NotInstalledError, RolledBack, RuntimeBuildFailed
from installer.inventory import Inventory
from installer.journal import JournalEntry, journal_action
from installer.layout import RootLayout
from installer.runtime import CHECK_TASK as RUNTIME_CHECK_TASK
from installer.staging import installer_lock
from installer.versions import release_digest

ACTIONS = ("start", "stop", "restart")
# Task names the installer recognises in playbook events (they are part of the roles' contract).
ROLLED_BACK_TASK = "Report that the release failed and the node was rolled back"
START_TASKS = ("Start the appliance under the supervisor and wait for its health check",
               "Start the appliance unit", "Wait for the appliance unit's health check")
COPY_TASKS = ("Copy the release files from the verified bundle",
              "Place the release files from the verified bundle and check their signed sha256",
              "Place the copied release files and check their signed sha256")


def service_vars(inv: Inventory, *, start: bool, restart: bool = False) -> dict[str, Any]:
    """Extra vars that tell the roles how to run the appliance."""
    return {
        "sovereign_rollout_start": start,
        "sovereign_rollout_restart": restart,
        "sovereign_service_mode": inv.service.mode,
        "sovereign_service_start_timeout_s": inv.service.start_timeout_s,
        "sovereign_service_stop_timeout_s": inv.service.stop_timeout_s,
    }


def service_timeout(inv: Inventory) -> float:
    """Playbook timeout that leaves every node its start and stop waits (twice: a rollback)."""
    per_node = 2 * (inv.service.start_timeout_s + inv.service.stop_timeout_s) + 300
    return max(DEFAULT_TIMEOUT_S, per_node * len(inv.nodes))


def playbook_error(result: PlaybookResult) -> AnsibleFailed:
    """RolledBack when a node was put back on its previous release, RuntimeBuildFailed when a
    node could not build the release's runtime, else AnsibleFailed."""
    rolled = next((f for f in result.failures if task_is(f.task, ROLLED_BACK_TASK)), None)
    if rolled is not None:
        return RolledBack(rolled.msg, result)
    runtime = next((f for f in result.failures if task_is(f.task, RUNTIME_CHECK_TASK)), None)
    if runtime is not None:
        return RuntimeBuildFailed(runtime.msg, result)
    return AnsibleFailed(f"ansible-playbook failed: {result.summary()}", result)


def service_notes(result: PlaybookResult) -> list[str]:
    """One line per supervisor report worth showing (starts, stops, kills, failures)."""
    notes = []
    for report in result.service_reports:
        if (report.get("changed") or report.get("sovereign_service") != "ok" or report.get("killed")
                or report.get("skipped") or report.get("timed_out")):
            notes.append(f"{report.get('host')}: {report.get('message', '')}".strip())
    return notes


def start_seconds(result: PlaybookResult) -> float:
    """Seconds from spawning the appliance to its healthy /health, over all starts in the run."""
    reported = [float(r["start_s"]) for r in result.service_reports if "start_s" in r]
    return sum(reported) if reported else result.seconds_in(*START_TASKS)


@dataclass(frozen=True)
class ServiceResult:
    action: str
    root: Path
    version: str
    nodes: list[str]
    changed: int
    playbook: PlaybookResult
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": True, "action": self.action, "root": str(self.root), "version": self.version,
                "nodes": self.nodes, "changed": self.changed, "notes": self.notes,
                "playbook": self.playbook.to_dict()}


def run_locked_outside_root(layout: RootLayout, playbook: str, inventory: Inventory, extra_vars: dict[str, Any],
                            *, label: str, journal: JournalEntry, console: Console | None) -> PlaybookResult:
    """Run ``playbook`` under the installer lock with its work directory outside ROOT (a play may
    remove most of ROOT); on failure journal ``journal``'s action as failed with the error and raise it."""
    with installer_lock(layout), tempfile.TemporaryDirectory(prefix="sovereign-installer-") as tmp:
        work = Path(tmp)
        with playbook_progress(console, label) as on_event:
            result = run_playbook(playbook, inventory=inventory.to_ansible(work / "remote-tmp", layout.root),
                                  extra_vars=extra_vars, work_dir=work / "ansible", on_event=on_event,
                                  timeout_s=service_timeout(inventory))
    if not result.ok:
        error = playbook_error(result)
        journal_action(layout, journal.outcome("failed", str(error)), create=False)
        raise error
    return result


def control_service(root: Path, action: str, inventory: Inventory, *, console: Console | None = None) -> ServiceResult:
    """Start, stop or restart the appliance of ``current`` on every node, one node at a time."""
    if action not in ACTIONS:
        raise InputError(f"service action: expected one of {ACTIONS}, found {action!r}")
    layout = RootLayout(root)
    if not layout.root.is_dir():
        raise NotInstalledError(f"{layout.root}: expected an appliance root, found no directory")
    version = layout.current_version()
    if version is None and action != "stop":
        raise NotInstalledError(f"{layout.root}: expected an installed release to {action}, found no current symlink")
    digest = release_digest(layout, version)
    extra_vars = {"sovereign_service_action": action,
                  # a restart drains each engine node on the gateways (their HTTPS port) first
                  "sovereign_release_gateway_host": inventory.gateway.host,
                  "sovereign_release_gateway_port": inventory.gateway.port,
                  **service_vars(inventory, start=action != "stop")}
    entry = JournalEntry(action, "ok", version or "", digest, inventory.names, "")
    result = run_locked_outside_root(layout, "service.yml", inventory, extra_vars, label=f"{action} appliance",
                                     journal=entry, console=console)
    notes = service_notes(result)
    journal_action(layout, entry.outcome("ok", "; ".join(notes) or "no change"), create=False)
    return ServiceResult(action=action, root=layout.root, version=version or "", nodes=inventory.names,
                         changed=result.changed, playbook=result, notes=notes)
