"""The appliance runtime: the Python environment that runs a release's `appliance serve`.

A bundle with a wheelhouse (``wheels/``) carries its own runtime. The installer copies the wheels
into the release (releases/<version>/wheels/, checked against the signed hashes) and the
``sovereign_runtime`` role builds ROOT/runtimes/<id>/ from them with
``pip install --isolated --no-index --require-hashes`` (roles/sovereign_runtime/files/runtimectl.py).
``<id>`` is content-addressed (:func:`runtime_id`), so releases with the same wheels share one
runtime: an upgrade that changes only the model or policies installs nothing, and a rollback keeps
its runtime. The release records its runtime id in release.json; the supervisor (appliancectl)
and the systemd unit start ROOT/runtimes/<id>/bin/appliance for it.

A bundle without wheels runs on the "node runtime": the inventory's ``appliance`` (or the
``appliance`` next to the node's python), as before.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airgap_bundle.sbom import parse_wheel_name
from installer.ansible_runner import PlaybookResult
from installer.errors import BundleContentError
from installer.inventory import Inventory
from installer.layout import RootLayout

WHEELS_PREFIX = "wheels/"
NODE_RUNTIME = "node"
# Task names the installer recognises in playbook events (part of the role's contract).
BUILD_TASK = "Build the runtime from the release's wheels with pip --no-index, or reuse it"
CHECK_TASK = "Check that the runtime of the release is ready"


@dataclass(frozen=True)
class WheelPin:
    file: str  # the wheel's file name under wheels/
    name: str  # normalised project name
    version: str
    sha256: str  # hex, as signed in the bundle


@dataclass(frozen=True)
class RuntimePlan:
    """The runtime a release needs: its content-addressed id and the pinned wheels."""

    id: str
    wheels: tuple[WheelPin, ...]

    def to_vars(self) -> dict[str, Any]:
        return {"sovereign_runtime_id": self.id,
                "sovereign_runtime_wheels": [vars(w) for w in self.wheels]}


def runtime_id(wheels: dict[str, str]) -> str:
    """First 16 hex digits of sha256 over the sorted "<wheel file> <sha256>" lines, one per wheel
    (runtimectl.py computes the same from the files on the node and refuses a mismatch)."""
    text = "".join(f"{name} {digest}\n" for name, digest in sorted(wheels.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def plan_runtime(files: list[dict[str, str]], bundle: Path | str) -> RuntimePlan | None:
    """The runtime for the release files ``[{dest, sha256}]``; None when there are no wheels.

    Every file under wheels/ must be a wheel, and one version per project (pip installs them all,
    pinned by the hashes signed in the bundle)."""
    pins: list[WheelPin] = []
    for f in files:
        dest = f["dest"]
        if not dest.startswith(WHEELS_PREFIX):
            continue
        name = dest[len(WHEELS_PREFIX):]
        parsed = parse_wheel_name(name) if "/" not in name else None
        if parsed is None:
            raise BundleContentError(f"{bundle}: {dest}: expected a wheel file (name-version-tags.whl) directly "
                                     "under wheels/, found something else")
        pins.append(WheelPin(file=name, name=parsed[0], version=parsed[1], sha256=f["sha256"]))
    if not pins:
        return None
    versions: dict[str, set[str]] = {}
    for pin in pins:
        versions.setdefault(pin.name, set()).add(pin.version)
    clashes = {name: sorted(v) for name, v in versions.items() if len(v) > 1}
    if clashes:
        found = "; ".join(f"{name} {', '.join(v)}" for name, v in sorted(clashes.items()))
        raise BundleContentError(f"{bundle}: wheels/: expected one version of each project, found {found}")
    pins.sort(key=lambda p: p.file)
    return RuntimePlan(runtime_id({p.file: p.sha256 for p in pins}), tuple(pins))


def runtime_vars(plan: RuntimePlan | None) -> dict[str, Any]:
    """Extra vars for the sovereign_runtime role (and release.json's ``runtime``)."""
    return plan.to_vars() if plan is not None else {"sovereign_runtime_id": "", "sovereign_runtime_wheels": []}


def runtime_notes(result: PlaybookResult, plan: RuntimePlan | None, inv: Inventory) -> list[str]:
    """What the install did about the runtime, per node."""
    if plan is None:
        return [f"{n.name}: bundle has no wheels: the appliance runs from the node runtime ({n.appliance_command()})"
                for n in inv.nodes]
    return [f"{r.get('host')}: {r.get('message', '')}".strip() for r in result.runtime_reports]


def runtime_seconds(result: PlaybookResult) -> float:
    return result.seconds_in(BUILD_TASK)


@dataclass(frozen=True)
class ReleaseRuntime:
    """Which runtime a release runs on: ``id`` "node" for the node runtime."""

    id: str
    path: str
    present: bool

    def describe(self) -> str:
        if self.id == NODE_RUNTIME:
            return "node runtime"
        return f"runtimes/{self.id}" + ("" if self.present else " (missing)")


def release_runtime(layout: RootLayout, version: str) -> ReleaseRuntime:
    """The runtime recorded in releases/<version>/release.json (releases without one, or
    installed before runtimes existed, run on the node runtime)."""
    try:
        record = json.loads((layout.release(version) / "release.json").read_text())
    except (OSError, ValueError):
        record = {}
    rid = record.get("runtime") if isinstance(record, dict) else None
    if not isinstance(rid, str) or not rid:
        return ReleaseRuntime(NODE_RUNTIME, "", True)
    path = layout.runtime(rid)
    return ReleaseRuntime(rid, str(path), (path / "runtime.json").is_file() and (path / "bin" / "appliance").is_file())
