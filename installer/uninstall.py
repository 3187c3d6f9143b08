"""uninstall: stop the appliance and remove what the installer put on the nodes.

Kept unless the audit data is purged: ROOT/data (database and tamper-evident audit log),
ROOT/journal (installer journal), ROOT/state/trust (bundle rollback protection for a later
install) and ROOT/secrets/audit-signing.key (so a reinstall continues the same audit chain).
Purging (``purge_audit=True``; the CLI wants ``--purge-audit`` twice) removes the whole root; its
journal goes with it, so that last action is reported only on the command line. The
installation CA (ROOT/state/pki) is removed either way, with the node TLS material it issued and
each node's egress firewall table: a reinstall makes a new CA that clients must trust again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from installer.ansible_runner import PlaybookResult
from installer.errors import NotInstalledError
from installer.inventory import Inventory
from installer.journal import JournalEntry, journal_action
from installer.layout import RootLayout
from installer.pki import remove_pki
from installer.service import run_locked_outside_root, service_notes, service_vars
from installer.versions import release_digest

KEPT = ("data", "journal", "state/trust", "secrets/audit-signing.key")


@dataclass(frozen=True)
class UninstallResult:
    root: Path
    version: str | None
    nodes: list[str]
    purged: bool
    kept: list[str]
    notes: list[str]
    playbook: PlaybookResult

    def to_dict(self) -> dict[str, Any]:
        return {"ok": True, "action": "uninstall", "root": str(self.root), "version": self.version,
                "nodes": self.nodes, "purged": self.purged, "kept": self.kept, "notes": self.notes,
                "playbook": self.playbook.to_dict()}


def uninstall(root: Path, inventory: Inventory, *, purge_audit: bool = False,
              console: Console | None = None) -> UninstallResult:
    layout = RootLayout(root)
    if not layout.root.is_dir():
        raise NotInstalledError(f"{layout.root}: expected an appliance root to uninstall, found no directory")
    version = layout.current_version()
    digest = release_digest(layout, version)
    extra_vars = {"sovereign_common_purge_audit": purge_audit,
                  **service_vars(inventory, start=False)}
    # ROOT (or most of it) is removed while ansible runs: its work directory lies outside ROOT.
    result = run_locked_outside_root(layout, "uninstall.yml", inventory, extra_vars, label="uninstall",
                                     journal=JournalEntry("uninstall", "ok", version or "", digest,
                                                          inventory.names, ""), console=console)
    notes = service_notes(result)
    if not purge_audit:
        remove_pki(layout)  # the installation CA's key goes with the TLS material it issued
    kept = [] if purge_audit else [k for k in KEPT if (layout.root / k).exists()]
    if not purge_audit:
        detail = f"removed release {version or '-'} and its service; kept {', '.join(kept) or 'nothing'}"
        journal_action(layout, JournalEntry("uninstall", "ok", version or "", digest, inventory.names, detail),
                       create=False)
        try:
            layout.staging.rmdir()
        except OSError:
            pass
    return UninstallResult(root=layout.root, version=version, nodes=inventory.names, purged=purge_audit,
                           kept=kept, notes=notes, playbook=result)
