"""Signed air-gap bundles: build, sign, verify, inspect, unpack; keys; model import; SBOM.

Public API (see each function's docstring)::

    import_gguf(gguf, out, dtype="float32") -> Path        GGUF -> HF directory (safetensors)
    import_hf(src, out) -> Path                            validate + copy an HF directory
    init_keys(keydir, thresholds=None, counts=None) -> Path   keys + KEYDIR/root.json
    rotate_keys(keydir, roles) -> Path                     new root version (chain)
    build_bundle(out, keydir, version, expires, *, model_dir, policies_dir, ...) -> Path
    verify_bundle(bundle, trusted_root, state_dir=None) -> VerificationReport
    commit_trust(report, state_dir) -> Path                persist versions (rollback protection)
    unpack_bundle(bundle, dest, report) -> list[Path]
    inspect_bundle(bundle) -> dict                         untrusted look inside
    split_bundle(bundle, out_dir, part_size) / join_parts(index, out)   size-capped media
    download_wheelhouse(requirements, out, WheelTarget(platform, python)) -> list[Path]   pip download

Delta bundles: ``build_bundle(..., base_manifest=...)`` leaves unchanged files out of the tar;
``verify_bundle(..., base_dir=...)`` checks them in the installed base release instead.
Large files: ``build_bundle(..., chunk_bytes=64 MiB)`` signs per-chunk sha256 too, so that
``verify_bundle(..., workers=N)`` hashes the chunks of one big file on N threads.
Format, checks and CLI: docs/bundles.md.

Heavy dependencies (torch, gguf, transformers) are imported only by ``import_gguf``.
"""

from .build import build_bundle
from .errors import (
    BuildError,
    BundleError,
    KeyManagementError,
    ModelImportError,
    TrustStateError,
    UnpackError,
    VerificationError,
)
from .gguf_import import import_gguf
from .hf_import import import_hf
from .inspection import inspect_bundle
from .keys import init_keys, rotate_keys
from .layout import Limits
from .parts import PartsError, join_parts, split_bundle
from .report import CheckResult, TargetInfo, VerificationReport
from .testmodel import default_model_dir, find_smollm2_gguf
from .trust_state import commit_trust
from .unpack import unpack_bundle
from .verify import CHECKS, verify_bundle
from .wheelhouse import WheelTarget, download_wheelhouse

__all__ = [
    "CHECKS",
    "BuildError",
    "BundleError",
    "CheckResult",
    "KeyManagementError",
    "Limits",
    "ModelImportError",
    "PartsError",
    "TargetInfo",
    "TrustStateError",
    "UnpackError",
    "VerificationError",
    "VerificationReport",
    "WheelTarget",
    "build_bundle",
    "commit_trust",
    "default_model_dir",
    "download_wheelhouse",
    "find_smollm2_gguf",
    "import_gguf",
    "import_hf",
    "init_keys",
    "inspect_bundle",
    "join_parts",
    "rotate_keys",
    "split_bundle",
    "unpack_bundle",
    "verify_bundle",
]
