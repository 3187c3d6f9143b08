"""status: which releases are installed under ROOT, which is current, from which bundle, and
whether the appliance runs and answers its HTTPS health check (supervisor mode, this machine)."""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

from installer.ansible_runner import PLAYBOOK_DIR
from installer.interrupted import read_marker
from installer.journal import read_entries
from installer.layout import RootLayout
from installer.pki import read_pki_status
from installer.runtime import release_runtime
from installer.staging import lock_held
from installer.versions import installed_versions, read_release_config

CTL_SCRIPT = PLAYBOOK_DIR / "roles" / "sovereign_service" / "files" / "appliancectl.py"


@dataclass(frozen=True)
class ReleaseInfo:
    version: str
    path: str
    bundle_digest: str
    model: str
    current: bool
    # the runtime the release runs on: ROOT/runtimes/<runtime>, or "node" (the node's appliance)
    runtime: str = "node"
    runtime_present: bool = True


@dataclass(frozen=True)
class ServiceState:
    """The appliance as the supervisor on this machine sees it (None where it never ran here)."""

    running: bool
    pid: int | None
    version: str | None
    url: str | None
    healthy: bool
    detail: str


@dataclass(frozen=True)
class StatusReport:
    root: str
    installed: bool
    current: str | None
    bundle_digest: str | None
    releases: list[ReleaseInfo] = field(default_factory=list)
    last_action: dict[str, Any] | None = None
    service: ServiceState | None = None
    last_rollout: dict[str, Any] | None = None
    # a run that died (its marker is still there and no run holds the lock): what to do about it
    interrupted: str | None = None
    # the installation CA (fingerprint, expiry) and each node certificate's expiry (installer/pki.py)
    pki: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@cache
def appliancectl() -> ModuleType:
    """The node supervisor script shipped in the service role, loaded as a module (one source of
    truth for pidfile, liveness and the health probe)."""
    spec = importlib.util.spec_from_file_location("sovereign_appliancectl", CTL_SCRIPT)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {CTL_SCRIPT}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_service_state(layout: RootLayout) -> ServiceState | None:
    ctl = appliancectl()
    paths = ctl.Paths(str(layout.root))
    if not paths.pidfile.exists() and not paths.state.exists():
        return None
    state = ctl.read_state(paths)
    pid = ctl.running_pid(paths)
    host, port = str(state.get("host", "127.0.0.1")), int(state.get("port", 0) or 0)
    url = f"https://{host}:{port}" if port else None
    if pid is None:
        if "stopped_at" in state:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(state["stopped_at"])))
            how = "SIGKILL after the stop timeout" if state.get("killed") else "SIGTERM"
            return ServiceState(False, None, state.get("version"), url, False, f"stopped at {when} ({how})")
        return ServiceState(False, None, state.get("version"), url, False, "not running (it exited by itself; "
                            "see logs/appliance.log)")
    health = ctl.probe(paths, host, port) if port else "no port recorded"
    if isinstance(health, dict):
        return ServiceState(True, pid, str(health.get("version")), url, health.get("status") == "ok",
                            f"/health: {json.dumps(health, sort_keys=True)}")
    return ServiceState(True, pid, state.get("version"), url, False, f"/health: {health}")


def read_status(root: Path, *, probe_service: bool = True) -> StatusReport:
    layout = RootLayout(root)
    current = layout.current_version()
    releases = []
    for version in installed_versions(layout):
        config = read_release_config(layout.release(version)) or {}
        model = config.get("model") if isinstance(config.get("model"), dict) else {}
        runtime = release_runtime(layout, version)
        releases.append(ReleaseInfo(version=version, path=str(layout.release(version)),
                                    bundle_digest=str(config.get("bundle_digest", "")),
                                    model=str((model or {}).get("name", "")), current=version == current,
                                    runtime=runtime.id, runtime_present=runtime.present))
    digest = next((r.bundle_digest for r in releases if r.current), None)
    entries = read_entries(layout.journal)
    try:
        rollout = json.loads((layout.state / "rollout.json").read_text())
    except (OSError, ValueError):
        rollout = None
    return StatusReport(root=str(layout.root), installed=current is not None, current=current, bundle_digest=digest,
                        releases=releases, last_action=entries[-1] if entries else None,
                        service=read_service_state(layout) if probe_service else None,
                        last_rollout=rollout if isinstance(rollout, dict) else None,
                        interrupted=_interrupted_run(layout), pki=read_pki_status(layout))


def _interrupted_run(layout: RootLayout) -> str | None:
    dead = read_marker(layout)
    if dead is None or lock_held(layout):
        return None  # nothing left behind, or that run is still going
    back = " or `sovereign-installer rollback`" if dead.action != "rollback" else ""
    return (f"{dead.describe()} did not finish; run it again to resume{back} (the next run journals it and "
            "removes what it left)")
