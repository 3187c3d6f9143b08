"""Validate and copy an existing Hugging Face model directory (config + safetensors + tokenizer)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

from .errors import ModelImportError
from .fsutil import replace_dir, staging_dir

REQUIRED = ("config.json", "tokenizer.json")
# Pickle-based weight formats execute code on load; an appliance never ships them.
REFUSED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
SKIPPED_DIRS = (".git", ".cache", ".huggingface")
# A safetensors header larger than this is not a real header (the format's own limit is 100 MB).
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


def check_safetensors(path: Path) -> None:
    """Header length and JSON readable; declared data ends exactly at the end of the file."""
    size = path.stat().st_size
    with open(path, "rb") as stream:
        raw = stream.read(8)
        if len(raw) != 8:
            raise ModelImportError(path, f"expected an 8-byte safetensors header length, found {len(raw)} bytes")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(MAX_SAFETENSORS_HEADER, size - 8):
            raise ModelImportError(
                path, f"expected a header length <= {min(MAX_SAFETENSORS_HEADER, size - 8)}, found {header_len}"
            )
        try:
            header = json.loads(stream.read(header_len))
        except ValueError as exc:
            raise ModelImportError(path, f"expected a JSON safetensors header, found invalid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ModelImportError(path, "expected a JSON object as safetensors header")
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        raise ModelImportError(
            path, f"expected {8 + header_len + end} bytes from the header's offsets, found {size} (truncated?)"
        )


def validate_hf_dir(src: Path) -> list[Path]:
    """Check ``src`` is a usable HF model directory; return the files to copy (relative paths)."""
    if not src.is_dir():
        raise ModelImportError(src, "expected a Hugging Face model directory, found no such directory")
    for name in REQUIRED:
        if not (src / name).is_file():
            raise ModelImportError(src / name, f"expected {name} in the model directory, found none")
        try:
            json.loads((src / name).read_text())
        except ValueError as exc:
            raise ModelImportError(src / name, f"expected valid JSON, found: {exc}") from exc
    weights = sorted(src.glob("*.safetensors"))
    if not weights:
        raise ModelImportError(src, "expected at least one *.safetensors file, found none")
    for path in weights:
        check_safetensors(path)
    files: list[Path] = []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if any(part in SKIPPED_DIRS for part in rel.parts) or not path.is_file():
            continue
        if path.suffix.lower() in REFUSED_SUFFIXES:
            continue
        files.append(rel)
    return files


def import_hf(src: Path, out: Path) -> Path:
    """Validate ``src`` and copy it to ``out`` atomically (pickle weight files are left out)."""
    src, out = Path(src), Path(out)
    files = validate_hf_dir(src)
    if out.resolve() == src.resolve():
        raise ModelImportError(out, "expected an output directory different from the source")
    with staging_dir(out) as stage:
        for rel in files:
            target = stage / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, target)  # follows symlinks: HF caches link to blobs
        replace_dir(stage, out)
    return out
