"""Offline installer for the sovereign appliance: preflight, verify, install, upgrade,
rollback, start/stop/restart, status, uninstall, with ansible-core playbooks shipped inside and a
journal of every action.

Public API::

    install_bundle(bundle, trusted_root, root, inventory=None, *, console=None, upgrade=False,
                   preflight=False, allow_cpu=False, start=False) -> InstallResult
    rollback(root, to=None, inventory=None, *, console=None, start=False) -> InstallResult
    control_service(root, "start" | "stop" | "restart", inventory, *, console=None) -> ServiceResult
    uninstall(root, inventory, *, purge_audit=False, console=None) -> UninstallResult
    read_status(root) -> StatusReport
    run_preflight(root, *, inventory=None, bundle=None, allow_cpu=False) -> PreflightReport
    load_inventory(path=None) -> Inventory
"""

from installer.errors import (
    EXIT_ANSIBLE,
    EXIT_INPUT,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_ROLLED_BACK,
    AnsibleFailed,
    BundleContentError,
    InputError,
    InstallerBusy,
    InstallerError,
    InventoryError,
    NotInstalledError,
    PreflightFailed,
    ReleaseConflict,
    RolledBack,
    RuntimeBuildFailed,
    VerificationFailed,
)
from installer.install import InstallResult, install_bundle
from installer.inventory import Inventory, InventoryNode, default_inventory, load_inventory
from installer.journal import JournalEntry, append_entry, read_entries
from installer.layout import RootLayout
from installer.preflight import PreflightCheck, PreflightConfig, PreflightReport, run_preflight
from installer.rollback import rollback
from installer.service import ServiceResult, control_service
from installer.status import ReleaseInfo, ServiceState, StatusReport, read_status
from installer.uninstall import UninstallResult, uninstall

__all__ = [
    "EXIT_ANSIBLE",
    "EXIT_INPUT",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_ROLLED_BACK",
    "AnsibleFailed",
    "BundleContentError",
    "InputError",
    "InstallResult",
    "InstallerBusy",
    "InstallerError",
    "Inventory",
    "InventoryError",
    "InventoryNode",
    "JournalEntry",
    "NotInstalledError",
    "PreflightCheck",
    "PreflightConfig",
    "PreflightFailed",
    "PreflightReport",
    "ReleaseConflict",
    "ReleaseInfo",
    "RolledBack",
    "RootLayout",
    "RuntimeBuildFailed",
    "ServiceResult",
    "ServiceState",
    "StatusReport",
    "UninstallResult",
    "VerificationFailed",
    "append_entry",
    "control_service",
    "default_inventory",
    "install_bundle",
    "load_inventory",
    "read_entries",
    "read_status",
    "rollback",
    "run_preflight",
    "uninstall",
]
