"""CycloneDX 1.5 SBOM of a bundle: each model (files, hashes, licence) and every wheel."""

from __future__ import annotations

import json
import re
import uuid
from datetime import datetime
from typing import Any

from .report import TargetInfo

_WHEEL = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl$")


def parse_wheel_name(filename: str) -> tuple[str, str] | None:
    """(normalised project name, version) from a wheel file name, or None if it is not one."""
    match = _WHEEL.match(filename)
    if not match:
        return None
    return re.sub(r"[-_.]+", "-", match.group("name")).lower(), match.group("version")


def _hashes(info: TargetInfo) -> list[dict[str, str]]:
    return [{"alg": "SHA-256", "content": info.sha256}]


def _license(spdx: str) -> list[dict[str, Any]]:
    if not spdx or spdx == "NOASSERTION":
        return []
    if re.fullmatch(r"[A-Za-z0-9.+-]+", spdx) and not spdx.startswith("LicenseRef-"):
        return [{"license": {"id": spdx}}]
    return [{"license": {"name": spdx}}]


def _model_component(name: str, spdx: str, files: dict[str, TargetInfo]) -> dict[str, Any]:
    weights = [p for p in files if p.endswith(".safetensors")]
    model: dict[str, Any] = {
        "type": "machine-learning-model",
        "bom-ref": f"model:{name}",
        "name": name,
        "licenses": _license(spdx),
        "components": [
            {"type": "file", "bom-ref": f"file:{p}", "name": p, "hashes": _hashes(t),
             "properties": [{"name": "size", "value": str(t.length)}]}
            for p, t in sorted(files.items())
        ],
    }
    if len(weights) == 1:
        model["hashes"] = _hashes(files[weights[0]])
    return model


def build_sbom(
    *,
    name: str,
    version: str,
    created: datetime,
    targets: dict[str, TargetInfo],
    models: list[tuple[str, str, str]],
) -> bytes:
    """The SBOM as stable JSON bytes: one machine-learning-model component per ``(name, SPDX licence,
    path prefix in the bundle)`` of ``models``, then the wheels. The serial number is derived from
    the contents (deterministic)."""
    components: list[dict[str, Any]] = []
    for model_name, spdx, prefix in models:
        files = {p: t for p, t in targets.items() if p.startswith(prefix + "/")}
        if files:
            components.append(_model_component(model_name, spdx, files))
    for path, info in sorted(targets.items()):
        if not path.startswith("wheels/"):
            continue
        filename = path.rsplit("/", 1)[-1]
        parsed = parse_wheel_name(filename)
        if parsed is None:
            components.append({"type": "file", "bom-ref": f"file:{path}", "name": path, "hashes": _hashes(info)})
            continue
        project, project_version = parsed
        components.append({
            "type": "library",
            "bom-ref": f"pkg:pypi/{project}@{project_version}#{filename}",
            "name": project,
            "version": project_version,
            "purl": f"pkg:pypi/{project}@{project_version}",
            "hashes": _hashes(info),
            "properties": [{"name": "filename", "value": filename}],
        })
    fingerprint = json.dumps({p: t.sha256 for p, t in sorted(targets.items())}, sort_keys=True)
    serial = uuid.uuid5(uuid.NAMESPACE_URL, f"airgap-bundle:{name}:{version}:{fingerprint}")
    bom = {
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "serialNumber": f"urn:uuid:{serial}",
        "version": 1,
        "metadata": {
            "timestamp": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "tools": {"components": [{"type": "application", "name": "airgap-bundle"}]},
            "component": {"type": "application", "bom-ref": f"bundle:{name}@{version}", "name": name,
                          "version": version},
        },
        "components": components,
    }
    return (json.dumps(bom, indent=2, sort_keys=True) + "\n").encode()
