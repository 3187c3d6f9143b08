"""Building a bundle: collect inputs, write them into one tar while hashing, add manifest + SBOM, sign.

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
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .bundle_models import ModelInput, manifest_entry, plan_models
from .errors import BuildError
from .hashing import DEFAULT_CHUNK_BYTES, ChunkHashes, RangeJob, default_workers, file_opener, hash_ranges, spans
from .layout import MANIFEST, MIN_CHUNK_BYTES, SBOM, metadata_member, target_member
from .progress import NullProgress, ProgressSink
from .report import TargetInfo
from .sbom import build_sbom
from .signing import check_signing_keys, sign_metadata
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


def _hash_inputs(files: list[SourceFile], sizes: dict[str, int], chunk_bytes: int, workers: int,
                 progress: ProgressSink) -> tuple[dict[str, TargetInfo], dict[str, ChunkHashes]]:
    """sha256 (and chunk hashes of large files) of input files, read in place on ``workers`` threads."""
    jobs: list[RangeJob] = []
    for f in files:
        opener = file_opener(f.source)
        jobs.append(RangeJob(f.target, -1, opener, 0, sizes[f.target]))
        if sizes[f.target] > chunk_bytes:
            jobs += [RangeJob(f.target, i, opener, off, n)
                     for i, (off, n) in enumerate(spans(sizes[f.target], chunk_bytes))]
    progress.begin("hashing unchanged inputs", sum(j.length for j in jobs))
    infos: dict[str, TargetInfo] = {}
    parts: dict[str, list[str]] = {}
    for result in hash_ranges(jobs, workers, progress.advance):
        job = result.job
        if result.read != job.length:
            raise BuildError(f"{job.key}: changed during the build: expected {job.length} bytes, found {result.read}")
        if job.index < 0:
            infos[job.key] = TargetInfo(job.length, result.sha256)
        else:
            parts.setdefault(job.key, []).append(result.sha256)
    progress.end()
    return infos, {k: ChunkHashes(chunk_bytes, tuple(v)) for k, v in parts.items()}


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


def _delta_candidates(files: list[SourceFile], sizes: dict[str, int], base_manifest: Path) -> list[SourceFile]:
    """Inputs with the same path and length as in the base release (only these need hashing first)."""
    contents = _read_base(base_manifest)["contents"]
    return [f for f in files if isinstance(contents.get(f.target), dict)
            and contents[f.target].get("length") == sizes[f.target]]


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
    model_dir: Path | None = None,
    policies_dir: Path | None,
    model_dirs: Sequence[Path] = (),
    playbooks_dir: Path | None = None,
    wheelhouse: Path | None = None,
    name: str = "sovereign-appliance",
    created: datetime | None = None,
    metadata_version: int | None = None,
    progress: ProgressSink | None = None,
    base_manifest: Path | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    workers: int | None = None,
) -> Path:
    """Write a signed, deterministic bundle tar; return its path.

    ``out`` is the .tar path, or a directory that receives ``<name>-<version>.tar``.
    ``model_dir`` and then ``model_dirs`` are the models it carries; the first is the release's
    default model, under ``model/``, every further one under ``models/<name>/`` (bundle_models.py).
    ``base_manifest`` (the manifest.json of a release already installed) makes a delta bundle:
    targets.json still lists every file, but files with the same path, length and sha256 as in
    the base are left out of the tar; the verifier then reads them from the base release.
    Files longer than ``chunk_bytes`` also get signed per-chunk sha256 (parallel verification).

    Each input is read once, while it is written into the tar and hashed (delta candidates,
    which must be hashed before deciding, are read twice). Tar order: payload targets sorted,
    then targets/manifest.json and targets/sbom.cdx.json, then the metadata sorted by name.
    """
    progress = progress or NullProgress()
    if not version or "/" in version:
        raise ValueError(f"version must be a non-empty string without '/', got {version!r}")
    if chunk_bytes < MIN_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be >= {MIN_CHUNK_BYTES}, got {chunk_bytes}")
    created = _utc(created or default_created(), "created")
    expires = _utc(expires, "expires")
    if expires <= created:
        raise BuildError(f"expected expiry after creation {created.isoformat()}, found {expires.isoformat()}")
    tuf_version = metadata_version if metadata_version is not None else int(created.timestamp())
    if tuf_version < 1:
        raise ValueError(f"metadata_version must be >= 1, got {tuf_version}")

    models = plan_models([*([model_dir] if model_dir is not None else []), *model_dirs])
    files: list[SourceFile] = []
    for root, prefix in ([(m.source, m.prefix) for m in models]
                         + [(policies_dir, "policies"), (playbooks_dir, "playbooks"), (wheelhouse, "wheels")]):
        if root is not None:
            files += collect_tree(Path(root), prefix)
    if not files:
        raise BuildError("expected at least one input (model, policies, playbooks or wheelhouse), found none")
    check_signing_keys(Path(keydir))  # a missing key fails now, not after writing gigabytes
    sizes = {f.target: f.source.stat().st_size for f in files}
    targets: dict[str, TargetInfo] = {}
    chunks: dict[str, ChunkHashes] = {}
    omitted: list[str] = []
    if base_manifest is not None:
        candidates = _delta_candidates(files, sizes, Path(base_manifest))
        infos, cand_chunks = _hash_inputs(candidates, sizes, chunk_bytes, workers or default_workers(), progress)
        omitted = _unchanged(infos, Path(base_manifest))
        targets.update({p: infos[p] for p in omitted})
        chunks.update({p: cand_chunks[p] for p in omitted if p in cand_chunks})

    bundle = _bundle_path(Path(out), name, version)
    bundle.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{bundle.name}.", suffix=".tmp", dir=bundle.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as stream:
            with DeterministicTar(stream, mtime=int(created.timestamp()), progress=progress) as tar:
                payload = sorted((f for f in files if f.target not in omitted), key=lambda f: f.target)
                progress.begin("writing bundle", sum(sizes[f.target] for f in payload))
                for f in payload:
                    size = sizes[f.target]
                    digest, chunked = tar.add_file(target_member(f.target), f.source, size,
                                                   chunk_bytes if size > chunk_bytes else None)
                    targets[f.target] = TargetInfo(size, digest)
                    if chunked is not None:
                        chunks[f.target] = chunked
                progress.end()
                generated = _generated(targets, name, version, created, models, base_manifest, omitted)
                for path, data in generated.items():
                    tar.add_bytes(target_member(path), data)
                    targets[path] = TargetInfo(len(data), hashlib.sha256(data).hexdigest())
                signed = sign_metadata(Path(keydir), targets, expires=expires, version=tuf_version, chunks=chunks)
                for meta_name in sorted(signed.files):
                    tar.add_bytes(metadata_member(meta_name[: -len(".json")]), signed.files[meta_name])
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, bundle)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return bundle


def _generated(targets: dict[str, TargetInfo], name: str, version: str, created: datetime, models: list[ModelInput],
               base_manifest: Path | None, omitted: list[str]) -> dict[str, bytes]:
    """targets sbom.cdx.json, then manifest.json (which lists the SBOM among its contents).

    The manifest's ``model`` is the default model as bundles with one model always had it (files
    relative to model/); ``models`` lists every model, default first, with its path in the bundle."""
    sbom = build_sbom(name=name, version=version, created=created, targets=targets,
                      models=[(m.name, m.license, m.prefix) for m in models])
    contents = dict(targets)
    contents[SBOM] = TargetInfo(len(sbom), hashlib.sha256(sbom).hexdigest())

    def section(prefix: str) -> list[str]:
        return sorted(p[len(prefix) + 1:] for p in contents if p.startswith(prefix + "/"))

    manifest = _json_bytes({
        "schema": 1,
        "name": name,
        "version": version,
        "created": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": None if not models else {k: v for k, v in manifest_entry(models[0], contents).items() if k != "path"},
        "models": [manifest_entry(m, contents) for m in models],
        "policies": section("policies"),
        "playbooks": section("playbooks"),
        "wheels": section("wheels"),
        "contents": {p: {"length": t.length, "sha256": t.sha256} for p, t in sorted(contents.items())},
        **({"delta": {"base_version": _base_version(base_manifest), "omitted": omitted}} if base_manifest else {}),
    })
    return {SBOM: sbom, MANIFEST: manifest}
