"""install / upgrade: verify the bundle, unpack it to staging, run the install playbook,
commit the trusted state, journal the action.

Order matters and is fixed: (1) inputs are checked, (2) the bundle is verified against the
trusted root and ROOT/state/trust with nothing written anywhere, (3) the release is checked
against what is installed, (4) only then is ROOT touched: lock, staging, unpack (re-hashed),
policy validation, (5) ansible lays out the release and switches `current`, (6) the verified
TUF versions are committed (rollback protection), (7) the journal line is made durable.
A refused or failed run leaves no trusted state behind; it is journalled only where a
journal already exists (a refused bundle never creates anything on a fresh root).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from airgap_bundle import (
    BundleError,
    VerificationReport,
    commit_trust,
    inspect_bundle,
    unpack_bundle,
    verify_bundle,
)
from airgap_bundle.bundle_models import models_in_manifest
from installer.ansible_runner import PlaybookResult, run_playbook
from installer.database import database_vars
from installer.display import ByteProgress, playbook_progress
from installer.errors import (
    BundleContentError,
    InputError,
    InventoryError,
    NotInstalledError,
    PkiError,
    PreflightFailed,
    ReleaseConflict,
    RolledBack,
    VerificationFailed,
)
from installer.firewall import firewall_notes, firewall_vars
from installer.interrupted import tracked_run
from installer.inventory import Inventory, load_inventory
from installer.journal import JournalEntry, journal_action
from installer.layout import RootLayout
from installer.node_models import CHECK_NAME, ModelPlan, check_node_models, plan_node_models
from installer.pki import prepare_pki, tls_vars
from installer.preflight import PreflightReport, run_preflight
from installer.runtime import plan_runtime, runtime_notes, runtime_seconds, runtime_vars
from installer.service import (
    COPY_TASKS,
    playbook_error,
    service_notes,
    service_timeout,
    service_vars,
    start_seconds,
)
from installer.staging import installer_lock, run_dir
from installer.transfer import release_archive
from installer.versions import (
    installed_versions,
    is_newer,
    read_release_config,
    record_fleet_release,
    release_digest,
)
from policies import PolicyError, default_policy_dir, load_policy_set
from policies.effective import applied_policy_dir, load_in_force

# Bundle targets installed into the release (wheels/ too: the runtime is built from the release's
# copy, and an installed release is a complete base for delta bundles); playbooks/ is not. Of the
# models (model/ the default one, models/<name>/ the others) each node gets only the one it serves.
RELEASE_PREFIXES = ("model/", "models/", "policies/", "wheels/")
RELEASE_FILES = ("manifest.json", "sbom.cdx.json")


@dataclass(frozen=True)
class InstallResult:
    """What an install, upgrade or rollback did. ``changed`` counts ansible changes over all
    nodes: 0 means the release was already installed and in service."""

    action: str
    version: str
    bundle_digest: str
    root: Path
    release_dir: Path
    nodes: list[str]
    changed: int
    switched: bool
    previous: str | None
    playbook: PlaybookResult
    verification: VerificationReport | None = None
    notes: list[str] = field(default_factory=list)
    # seconds: verify, unpack, copy (ansible's copy task), ansible (the rest of the playbook),
    # service_start (spawn to healthy /health), total
    timings: dict[str, float] = field(default_factory=dict)
    started: bool = False

    @property
    def already_installed(self) -> bool:
        return self.changed == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": True, "action": self.action, "version": self.version, "bundle_digest": self.bundle_digest,
            "root": str(self.root), "release_dir": str(self.release_dir), "nodes": self.nodes,
            "changed": self.changed, "switched": self.switched, "previous": self.previous,
            "already_installed": self.already_installed, "notes": self.notes, "started": self.started,
            "timings": self.timings,
            "playbook": self.playbook.to_dict(),
            "verification": self.verification.to_dict() if self.verification is not None else None,
        }


def resolve_inventory(inventory: Path | str | Inventory | None) -> Inventory:
    return inventory if isinstance(inventory, Inventory) else load_inventory(inventory)


def declared_delta_base(bundle: Path) -> str | None:
    """The base version a delta bundle's manifest names, read WITHOUT trusting it: it only picks
    the installed release that verification reads the omitted targets from, and each of those is
    then checked against its signed length and sha256 like any other target. Verification then
    confirms the signed manifest names the same base (see _check_delta)."""
    try:
        manifest = inspect_bundle(bundle).get("manifest")
    except BundleError:
        return None  # verification will say what is wrong with it
    delta = manifest.get("delta") if isinstance(manifest, dict) else None
    base = delta.get("base_version") if isinstance(delta, dict) else None
    return str(base) if base else None


def delta_base_dir(bundle: Path, layout: RootLayout) -> Path | None:
    """The installed release a delta bundle builds on; raises NotInstalledError when it is not
    installed here (nothing is verified or written then)."""
    base = declared_delta_base(bundle)
    if base is None:
        return None
    installed = installed_versions(layout)
    if "/" in base or base in (".", "..") or base not in installed:
        raise NotInstalledError(
            f"{bundle}: a delta bundle on release {base}: expected {layout.release(base)} installed (a complete "
            f"release), found {'installed: ' + ', '.join(installed) if installed else 'no release'}; install the "
            f"full bundle of {base} first, or use the full bundle of this version")
    return layout.release(base)


def _check_delta(stage: Path, report: VerificationReport) -> None:
    """After unpacking: a delta bundle's signed manifest must name the base it was verified against."""
    if not report.from_base:
        return
    try:
        delta = json.loads((stage / "manifest.json").read_text()).get("delta")
    except (OSError, ValueError, AttributeError) as exc:
        raise BundleContentError(f"{report.bundle}: expected a readable manifest.json, found {exc}") from exc
    signed_base = delta.get("base_version") if isinstance(delta, dict) else None
    used = Path(report.base_dir).name
    if str(signed_base) != used:
        raise BundleContentError(f"{report.bundle}: expected the signed manifest to name base release {used}, "
                                 f"found {signed_base!r}")


def _verify(bundle: Path, trusted_root: Path, layout: RootLayout, console: Console | None,
            base_dir: Path | None = None) -> VerificationReport:
    try:
        return verify_bundle(bundle, trusted_root, state_dir=layout.trust, progress=ByteProgress(console),
                             base_dir=base_dir)
    except BundleError as exc:
        raise VerificationFailed(f"{bundle}: expected a verifiable bundle, found {exc}") from exc


def _release_files(report: VerificationReport) -> list[dict[str, str]]:
    return [
        {"src": path, "dest": path, "sha256": info.sha256.removeprefix("sha256:")}
        for path, info in sorted(report.targets.items())
        if path.startswith(RELEASE_PREFIXES) or path in RELEASE_FILES
    ]


def _default_policies(stage: Path) -> list[dict[str, str]]:
    """Bundles without policies get the installer's shipped defaults, hashed here."""
    files = []
    for src in sorted(default_policy_dir().glob("*.yaml")):
        data = src.read_bytes()
        dest = stage / "policies" / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        rel = f"policies/{src.name}"
        files.append({"src": rel, "dest": rel, "sha256": hashlib.sha256(data).hexdigest()})
    return files


def _in_bundle_terms(exc: PolicyError, stage: Path) -> str:
    """The policy error with staging paths replaced by paths inside the bundle (staging is
    deleted when the run ends)."""
    problems = getattr(exc, "problems", None)
    if not problems:
        return str(exc).replace(f"{stage}/", "")
    return "; ".join(f"{p.file.replace(f'{stage}/', '')}: {p.field}: expected {p.expected}, found {p.found}"
                     for p in problems)


def _model_plan(stage: Path, report: VerificationReport, inv: Inventory) -> ModelPlan:
    """The signed manifest's models and the one each node serves (models.py): every file a model
    lists must be a signed target of the bundle."""
    try:
        manifest = json.loads((stage / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise BundleContentError(f"{report.bundle}: expected a readable manifest.json, found {exc}") from exc
    try:
        models = models_in_manifest(manifest)
    except ValueError as exc:
        raise BundleContentError(f"{report.bundle}: manifest.json: {exc}") from exc
    if not models:
        raise BundleContentError(f"{report.bundle}: manifest.json: expected model.name or models, found neither")
    for model in models:
        unsigned = [f for f in model.files if f not in report.targets]
        if unsigned or not model.files:
            raise BundleContentError(f"{report.bundle}: manifest.json: model {model.name}: expected its files among "
                                     f"the signed targets, found {unsigned[:3] or 'no files'}")
    try:
        return plan_node_models(inv, models)
    except ValueError as exc:
        raise BundleContentError(f"{report.bundle}: {exc}") from exc


def _check_models_declared(bundle: Path, inv: Inventory) -> None:
    """Before anything is verified or written: each engine node names one model the bundle
    carries (read unverified; _model_plan checks the signed manifest again)."""
    check = check_node_models(inv, bundle)
    if check.status == "fail":
        raise PreflightFailed(f"preflight failed: {CHECK_NAME}: {check.detail}", PreflightReport([check]))


def _node_release(stage: Path, files: list[dict[str, str]], plan: ModelPlan, inv: Inventory,
                  work: Path) -> dict[str, Any]:
    """Per-node extra vars: each node's release files, its appliance.yaml model, and for SSH nodes
    the tar of those files (one per distinct set). An SSH node receives only the model it serves;
    the local node (the installer's own machine, where the verified files are hard-linked, not
    copied) keeps every model, so its release stays a complete base for delta bundles."""
    by_node = {n.name: files if n.connection == "local" else plan.node_files(n.name, files) for n in inv.nodes}
    archives: dict[str, str] = {}
    made: dict[str, str] = {}
    for node in inv.nodes:
        if node.connection != "ssh":
            continue
        loads = plan.by_node[node.name]
        key = loads.name if loads is not None else ""
        if key not in made:
            made[key] = str(release_archive(stage, by_node[node.name],
                                            work / f"release-files{'-' + key if key else ''}.tar"))
        archives[node.name] = made[key]
    return {"sovereign_release_files_by_node": by_node, "sovereign_release_archive_by_node": archives,
            "sovereign_release_model_by_node": {n.name: plan.appliance_model(n.name) for n in inv.nodes}}


def _database_vars(inv: Inventory, layout: RootLayout, work: Path) -> dict[str, Any]:
    """The shared database's per-node URLs and files, the migrating node, the audit settings
    (installer/database.py); InventoryError when the password file cannot be read."""
    roots = {n.name: inv.node_root(n, layout.root) for n in inv.gateway_nodes}
    try:
        return database_vars(inv.database, inv.audit, roots, [n.name for n in inv.gateway_nodes], work)
    except ValueError as exc:
        raise InventoryError(f"{inv.source}: {exc}") from None


def _check_release(layout: RootLayout, report: VerificationReport, upgrade: bool) -> None:
    """Refuse a version installed from another bundle, and for upgrade a non-newer version."""
    if not any(p.startswith(("model/", "models/")) for p in report.targets):
        raise BundleContentError(f"{report.bundle}: expected model/ or models/ files in the bundle, found none")
    existing = read_release_config(layout.release(report.version))
    if existing is not None and existing.get("bundle_digest") != report.digest:
        raise ReleaseConflict(
            f"release {report.version} is immutable: expected bundle {existing.get('bundle_digest')} "
            f"(installed), found {report.digest}; build the change as a new version")
    if upgrade:
        current = layout.current_version()
        if current is None:
            raise NotInstalledError(f"{layout.root}: expected an installed release to upgrade, found none; use install")
        if not is_newer(report.version, current):
            raise ReleaseConflict(f"upgrade: expected a version newer than {current}, found {report.version}; "
                                  "use rollback to go back")


def install_bundle(
    bundle: Path,
    trusted_root: Path,
    root: Path,
    inventory: Path | str | Inventory | None = None,
    *,
    console: Console | None = None,
    upgrade: bool = False,
    preflight: bool = False,
    allow_cpu: bool = False,
    start: bool = False,
    timeout_s: float | None = None,
) -> InstallResult:
    """Verify ``bundle`` against ``trusted_root`` and install it under ``root`` on the inventory's
    nodes (default: this machine). Raises an InstallerError subclass whose ``exit_code`` is the
    CLI's. Verification cannot be skipped. ``upgrade=True`` also requires an installed release
    older than the bundle's.

    ``start=True`` (the CLI's default) also puts the release in service node by node: stop the
    running appliance, switch ``current``, start the new release and wait for its HTTPS health
    check; a node that fails is switched back and restarted on its previous release and
    RolledBack (exit code 4) is raised. ``start=False`` only switches ``current``."""
    action = "upgrade" if upgrade else "install"
    bundle, trusted_root, layout = Path(bundle), Path(trusted_root), RootLayout(root)
    if not bundle.is_file():
        raise InputError(f"bundle: expected a bundle file, found nothing at {bundle}")
    if not trusted_root.is_file():
        raise InputError(f"trusted root: expected a root.json file, found nothing at {trusted_root}")
    if layout.root.exists() and not layout.root.is_dir():
        raise InputError(f"root: expected a directory, found a file at {layout.root}")
    inv = resolve_inventory(inventory)

    if preflight:
        pre = run_preflight(layout.root, inventory=inv, bundle=bundle, allow_cpu=allow_cpu)
        if not pre.ok:
            raise PreflightFailed("preflight failed: " + "; ".join(f"{c.name}: {c.detail}" for c in pre.failures), pre)
    _check_models_declared(bundle, inv)

    t0 = time.monotonic()
    try:
        base_dir = delta_base_dir(bundle, layout)
    except NotInstalledError as exc:
        journal_action(layout, JournalEntry(action, "refused", "", "", inv.names, str(exc)), create=False)
        raise
    report = _verify(bundle, trusted_root, layout, console, base_dir)
    verify_s = time.monotonic() - t0
    if not report.ok:
        failed = report.first_failure()
        where = f" [{failed.path}]" if failed and failed.path else ""
        message = (f"{bundle}: verification failed at check {failed.label}{where}: {failed.detail}"
                   if failed else f"{bundle}: verification failed")
        entry = JournalEntry(action, "refused", report.version, report.digest, inv.names, message)
        journal_action(layout, entry, create=False)
        raise VerificationFailed(message, report)
    try:
        _check_release(layout, report, upgrade)
    except (ReleaseConflict, BundleContentError, NotInstalledError) as exc:
        entry = JournalEntry(action, "refused", report.version, report.digest, inv.names, str(exc))
        journal_action(layout, entry, create=False)
        raise

    with installer_lock(layout), tracked_run(layout, action, report.version, report.digest, inv.names) as notes, \
            run_dir(layout) as work:
        result = _install_verified(action, bundle, report, layout, inv, work, console,
                                   timeout_s or service_timeout(inv), start)
    result.notes[:0] = notes
    result.timings["verify"] = round(verify_s, 3)
    result.timings["total"] = round(time.monotonic() - t0, 3)
    return result


def _install_verified(action: str, bundle: Path, report: VerificationReport, layout: RootLayout,
                      inv: Inventory, work: Path, console: Console | None, timeout_s: float,
                      start: bool) -> InstallResult:
    def journal(result: str, detail: str, *, what: str = action, version: str = report.version,
                digest: str = report.digest) -> None:
        entry = JournalEntry(what, result, version, digest, inv.names, detail)
        journal_action(layout, entry, create=True)

    stage = work / "bundle"
    t_unpack = time.monotonic()
    try:
        unpack_bundle(bundle, stage, report, progress=ByteProgress(console))
        _check_delta(stage, report)
        plan = _model_plan(stage, report, inv)
        files = _release_files(report)
        runtime = plan_runtime(files, bundle)
        notes = []
        if (stage / "policies").is_dir():
            load_policy_set(stage / "policies")
            applied = applied_policy_dir(layout.root / "data")
            if applied.is_dir():  # this host's policies applied while running stay on top: they must still fit
                load_in_force(stage / "policies", applied)
        else:
            files += _default_policies(stage)
            notes.append("bundle has no policies: installed the installer's default policies")
    except BundleError as exc:
        journal("refused", f"unpack failed: {exc}")
        raise VerificationFailed(f"{bundle}: expected the verified content when unpacking, found {exc}") from exc
    except PolicyError as exc:
        message = f"{bundle}: bundle policies: {_in_bundle_terms(exc, stage)}"
        journal("refused", message)
        raise BundleContentError(message) from exc
    except BundleContentError as exc:
        journal("refused", str(exc))
        raise

    unpack_s = time.monotonic() - t_unpack
    # only for verified, installable content: a refused bundle leaves no CA behind
    try:  # the installation CA and node certificates; the nodes' egress rules (ssh hosts resolved)
        pki = prepare_pki(layout, inv)
        node_security_vars = {**tls_vars(pki), **firewall_vars(inv), **_database_vars(inv, layout, work)}
    except (PkiError, InventoryError) as exc:
        journal("refused", str(exc))
        raise
    previous = layout.current_version()
    model_name = plan.default.name
    extra_vars = {
        "sovereign_version": report.version,
        "sovereign_bundle_digest": report.digest,
        "sovereign_release_staging_dir": str(stage),
        **_node_release(stage, files, plan, inv, work),
        "sovereign_release_gateway_host": inv.gateway.host,
        "sovereign_release_gateway_port": inv.gateway.port,
        # a fleet: engine nodes run `appliance node serve`, gateways route to these over mutual TLS
        "sovereign_release_fleet": inv.is_fleet,
        "sovereign_release_fleet_nodes": inv.fleet_nodes(model_name),  # each node's model: see _model_plan
        **runtime_vars(runtime),
        **service_vars(inv, start=start),
        **node_security_vars,
    }
    with playbook_progress(console, f"{action} {report.version}") as on_event:
        result = run_playbook("install.yml", inventory=inv.to_ansible(work / "remote-tmp", layout.root),
                              extra_vars=extra_vars, work_dir=work / "ansible", on_event=on_event, timeout_s=timeout_s)
    if not result.ok:
        error = playbook_error(result)
        journal("failed", str(error) if isinstance(error, RolledBack) else result.summary())
        if isinstance(error, RolledBack) and previous and previous != report.version:
            journal("ok", f"put {previous} back in service after {report.version} failed its health check",
                    what="auto-rollback", version=previous,
                    digest=release_digest(layout, previous))
        raise error
    try:
        commit_trust(report, layout.trust)
    except BundleError as exc:
        journal("failed", f"installed but the trusted state was not committed: {exc}")
        raise VerificationFailed(f"{layout.trust}: expected to commit the trusted state, found {exc}") from exc
    if not inv.installs_into(layout.root):  # the nodes' roots are elsewhere: note what they run here
        record_fleet_release(layout, report.version, report.digest, model_name, inv.names)
    switched = previous != report.version
    service_s = start_seconds(result)
    copy_s = result.seconds_in(*COPY_TASKS)
    runtime_s = runtime_seconds(result)
    timings = {"unpack": round(unpack_s, 3), "copy": round(copy_s, 3),
               **({"runtime": round(runtime_s, 3)} if runtime is not None else {}),
               "ansible": round(max(result.wall_s - copy_s - runtime_s - service_s, 0.0), 3),
               "service_start": round(service_s, 3), "playbook": round(result.wall_s, 3)}
    notes += runtime_notes(result, runtime, inv)
    notes += service_notes(result)
    notes += pki.notes() + firewall_notes(result)
    if result.changed == 0:
        detail = f"release {report.version} already installed and current: no changes"
    else:
        detail = f"installed release {report.version} ({result.changed} changes)"
        if switched:
            detail += f", switched current from {previous}" if previous else ", switched current"
        if start:
            detail += "; appliance running and healthy"
    journal("ok", detail)
    return InstallResult(action=action, version=report.version, bundle_digest=report.digest, root=layout.root,
                         release_dir=layout.release(report.version), nodes=inv.names, changed=result.changed,
                         switched=switched, previous=previous, playbook=result, verification=report, notes=notes,
                         timings=timings, started=start)
