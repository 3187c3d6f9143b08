"""Building a bundle: collect inputs, hash (streamed), write manifest + SBOM, sign, write one tar.

Determinism: the same inputs, keys, version, ``created`` and ``expires`` give the same bytes
(Ed25519 signatures are deterministic, JSON is key-sorted, tar entries have fixed metadata).
TUF versions default to ``created`` as Unix seconds, so a later build always has a higher
version and rollback protection needs no counter kept by the builder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import BuildError
from .fsutil import sha256_file
from .layout import MANIFEST, SBOM, metadata_member, target_member
from .model_meta import read_model_info
from .progress import NullProgress, ProgressSink
from .report import TargetInfo
from .sbom import build_sbom
from .signing import sign_metadata
from .sources import SourceFile, collect_tree
from .tar_writer import DeterministicTar


def _utc(when: datetime, what: str) -> datetime:
    if when.tzinfo is None:
        raise ValueError(f"{what} must be timezone-aware, got a naive datetime")
    return when.astimezone(UTC).replace(microsecond=0)


def default_created() -> datetime:
    """``$SOURCE_DATE_EPOCH`` when set (reproducible builds), else now."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        return datetime.fromtimestamp(int(epoch), UTC)
    return datetime.now(UTC).replace(microsecond=0)


def _hash_sources(files: list[SourceFile], progress: ProgressSink) -> dict[str, TargetInfo]:
    total = sum(f.source.stat().st_size for f in files)
    progress.begin("hashing inputs", total)
    out = {}
    for f in files:
        digest, length = sha256_file(f.source, on_chunk=progress.advance)
        out[f.target] = TargetInfo(length, digest)
    progress.end()
    return out


def _json_bytes(obj: object) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _read_base(base_manifest: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(base_manifest).read_text())
        if not isinstance(data.get("contents"), dict):
            raise ValueError("no 'contents' object")
    except (OSError, ValueError, AttributeError) as exc:
        raise BuildError(f"{base_manifest}: expected a bundle manifest.json with contents, found: {exc}") from exc
    return dict(data)


def _base_version(base_manifest: Path) -> str:
    return str(_read_base(base_manifest).get("version", ""))


def _unchanged(targets: dict[str, TargetInfo], base_manifest: Path) -> list[str]:
    """Payload targets identical (path, length, sha256) to the base release's."""
    contents = _read_base(base_manifest)["contents"]
    same = []
    for path, info in sorted(targets.items()):
        old = contents.get(path)
        if isinstance(old, dict) and old.get("length") == info.length and old.get("sha256") == info.sha256:
            same.append(path)
    return same


def _bundle_path(out: Path, name: str, version: str) -> Path:
    if out.is_dir():
        return out / f"{name}-{version}.tar"
    if out.suffix != ".tar":
        raise BuildError(f"{out}: expected an existing directory or a path ending in .tar")
    return out


def build_bundle(
    out: Path,
    keydir: Path,
    version: str,
    expires: datetime,
    *,
    model_dir: Path | None,
    policies_dir: Path | None,
    playbooks_dir: Path | None = None,
    wheelhouse: Path | None = None,
    name: str = "sovereign-appliance",
    created: datetime | None = None,
    metadata_version: int | None = None,
    progress: ProgressSink | None = None,
    base_manifest: Path | None = None,
) -> Path:
    """Write a signed, deterministic bundle tar; return its path.

    ``out`` is the .tar path, or a directory that receives ``<name>-<version>.tar``.
    ``base_manifest`` (the manifest.json of a release already installed) makes a delta bundle:
    targets.json still lists every file, but files with the same path, length and sha256 as in
    the base are left out of the tar; the verifier then reads them from the base release.
    """
    progress = progress or NullProgress()
    if not version or "/" in version:
        raise ValueError(f"version must be a non-empty string without '/', got {version!r}")
    created = _utc(created or default_created(), "created")
    expires = _utc(expires, "expires")
    if expires <= created:
        raise BuildError(f"expected expiry after creation {created.isoformat()}, found {expires.isoformat()}")
    tuf_version = metadata_version if metadata_version is not None else int(created.timestamp())
    if tuf_version < 1:
        raise ValueError(f"metadata_version must be >= 1, got {tuf_version}")

    files: list[SourceFile] = []
    for root, prefix in ((model_dir, "model"), (policies_dir, "policies"), (playbooks_dir, "playbooks"),
                         (wheelhouse, "wheels")):
        if root is not None:
            files += collect_tree(Path(root), prefix)
    if not files:
        raise BuildError("expected at least one input (model, policies, playbooks or wheelhouse), found none")
    targets = _hash_sources(files, progress)
    omitted = _unchanged(targets, base_manifest) if base_manifest is not None else []

    info = read_model_info(Path(model_dir)) if model_dir is not None else {}
    model_name = str(info.get("name") or Path(model_dir).name) if model_dir is not None else None
    sbom = build_sbom(name=name, version=version, created=created, targets=targets, model_name=model_name,
                      model_license=str(info.get("license", "NOASSERTION")))
    targets[SBOM] = TargetInfo(len(sbom), hashlib.sha256(sbom).hexdigest())

    def section(prefix: str) -> list[str]:
        return sorted(p[len(prefix) + 1:] for p in targets if p.startswith(prefix + "/"))

    manifest = _json_bytes({
        "schema": 1,
        "name": name,
        "version": version,
        "created": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": None if model_dir is None else {"name": model_name, "license": info.get("license", "NOASSERTION"),
                                                  "source": info.get("source"), "files": section("model")},
        "policies": section("policies"),
        "playbooks": section("playbooks"),
        "wheels": section("wheels"),
        "contents": {p: {"length": t.length, "sha256": t.sha256} for p, t in sorted(targets.items())},
        **({"delta": {"base_version": _base_version(base_manifest), "omitted": omitted}} if base_manifest else {}),
    })
    targets[MANIFEST] = TargetInfo(len(manifest), hashlib.sha256(manifest).hexdigest())

    signed = sign_metadata(Path(keydir), targets, expires=expires, version=tuf_version)
    generated = {SBOM: sbom, MANIFEST: manifest}
    sources = {f.target: f.source for f in files}

    bundle = _bundle_path(Path(out), name, version)
    bundle.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{bundle.name}.", suffix=".tmp", dir=bundle.parent)
    try:
        os.fchmod(fd, 0o644)
        progress.begin("writing bundle", sum(t.length for p, t in targets.items() if p in sources and p not in omitted))
        with os.fdopen(fd, "wb") as stream:
            with DeterministicTar(stream, mtime=int(created.timestamp()), progress=progress) as tar:
                for meta_name in sorted(signed.files):
                    tar.add_bytes(metadata_member(meta_name[: -len(".json")]), signed.files[meta_name])
                for path in sorted(targets):
                    if path in omitted:
                        continue
                    if path in generated:
                        tar.add_bytes(target_member(path), generated[path])
                    else:
                        tar.add_file(target_member(path), sources[path], targets[path].length, targets[path].sha256)
            stream.flush()
            os.fsync(stream.fileno())
        progress.end()
        os.replace(tmp, bundle)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return bundle
