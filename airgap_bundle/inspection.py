"""Inspecting a bundle without trusting it: members, metadata versions, expiry, signers, manifest.

Nothing here is verified; the output says so. Reads are bounded like the verifier's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tuf.api.metadata import Metadata

from .errors import BundleError
from .layout import MANIFEST, METADATA_DIR, TARGETS_DIR, Limits, target_member
from .tar_reader import StructureProblem, read_member, scan_members


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
    return {
        "bundle": str(bundle),
        "verified": False,
        "size": bundle.stat().st_size,
        "metadata": metadata,
        "targets": targets,
        "manifest": manifest,
    }
