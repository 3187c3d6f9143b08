"""Inspecting a bundle without trusting it: members, metadata versions, expiry, signers, manifest, models.

Nothing here is verified; the output says so. Reads are bounded like the verifier's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tuf.api.metadata import Metadata

from .bundle_models import models_in_manifest
from .errors import BundleError
from .layout import MANIFEST, METADATA_DIR, SBOM, TARGETS_DIR, Limits, target_member
from .tar_reader import Member, StructureProblem, bundle_digest, read_member, scan_members


def _sbom_summary(bundle: Path, members: dict[str, Member], limits: Limits) -> dict[str, Any] | None:
    """Model (name, licence) and wheels (name, version) the CycloneDX SBOM lists; None without one."""
    member = members.get(target_member(SBOM))
    if member is None:
        return None
    try:
        bom = json.loads(read_member(bundle, member, limits.max_manifest_bytes))
        components = bom.get("components", [])
        models = [{"name": c.get("name"), "files": len(c.get("components", [])),
                   "licenses": [lic.get("license", {}).get("id") or lic.get("license", {}).get("name")
                                for lic in c.get("licenses", [])]}
                  for c in components if c.get("type") == "machine-learning-model"]
        wheels = sorted(f"{c.get('name')}=={c.get('version')}" for c in components if c.get("type") == "library")
        return {"format": f"{bom.get('bomFormat')} {bom.get('specVersion')}", "models": models, "wheels": wheels,
                "components": len(components)}
    except (StructureProblem, ValueError, AttributeError, TypeError) as exc:
        return {"error": str(exc)}


def inspect_bundle(bundle: Path, *, limits: Limits | None = None) -> dict[str, Any]:
    """A JSON-ready description of the bundle's contents, marked ``"verified": False``."""
    bundle = Path(bundle)
    limits = limits or Limits()
    try:
        members = scan_members(bundle, limits)
    except (StructureProblem, OSError) as exc:
        raise BundleError(f"{bundle}: cannot be inspected: {exc}") from exc
    metadata: dict[str, Any] = {}
    for name, member in sorted(members.items()):
        if not name.startswith(METADATA_DIR):
            continue
        entry: dict[str, Any] = {"size": member.size}
        try:
            md = Metadata.from_bytes(read_member(bundle, member, limits.max_metadata_bytes))
            entry.update({"type": md.signed.type, "version": md.signed.version,
                          "expires": f"{md.signed.expires:%Y-%m-%dT%H:%M:%SZ}",
                          "signed_by": sorted(k[:16] for k in md.signatures)})
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"
        metadata[name[len(METADATA_DIR):]] = entry
    manifest: Any = None
    if target_member(MANIFEST) in members:
        try:
            manifest = json.loads(read_member(bundle, members[target_member(MANIFEST)], limits.max_manifest_bytes))
        except (StructureProblem, ValueError) as exc:
            manifest = {"error": str(exc)}
    targets = {n[len(TARGETS_DIR):]: m.size for n, m in sorted(members.items()) if n.startswith(TARGETS_DIR)}
    models: Any = []
    if isinstance(manifest, dict) and "error" not in manifest:
        try:
            licences = {e.get("name"): e.get("license") for e in manifest.get("models") or [manifest.get("model")]
                        if isinstance(e, dict)}
            models = [{"name": m.name, "path": m.path, "license": licences.get(m.name), "files": len(m.files),
                       "bytes": sum(targets.get(f, 0) for f in m.files)}
                      for m in models_in_manifest(manifest)]
        except ValueError as exc:
            models = {"error": str(exc)}
    return {
        "bundle": str(bundle),
        "verified": False,
        "size": bundle.stat().st_size,
        "digest": f"sha256:{bundle_digest(bundle, members)}",
        "sbom": _sbom_summary(bundle, members, limits),
        "metadata": metadata,
        "targets": targets,
        "manifest": manifest,
        "models": models,
    }
