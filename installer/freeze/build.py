"""Build the one-file executable, cached under .cache/pyinstaller/<key>/ where the key hashes
everything that goes into it (installer, policies and airgap_bundle sources, the spec, and the
versions of Python, PyInstaller and ansible-core), so tests and `make installer` rebuild only
when something changed."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SPEC = Path(__file__).resolve().parent / "sovereign-installer.spec"
CACHE = REPO / ".cache" / "pyinstaller"
EXE_NAME = "sovereign-installer"
SOURCE_PACKAGES = ("installer", "policies", "airgap_bundle")
SOURCE_SUFFIXES = {".py", ".yml", ".yaml", ".j2", ".cfg", ".spec", ".json", ".txt"}
BUILD_TIMEOUT_S = 1800


def source_files() -> list[Path]:
    files = []
    for package in SOURCE_PACKAGES:
        for path in sorted((REPO / package).rglob("*")):
            if path.is_file() and path.suffix in SOURCE_SUFFIXES and "__pycache__" not in path.parts:
                files.append(path)
    return files


def build_key() -> str:
    digest = hashlib.sha256()
    versions = [sys.version, metadata.version("pyinstaller"), metadata.version("ansible-core")]
    digest.update("\n".join(versions).encode())
    for path in source_files():
        digest.update(str(path.relative_to(REPO)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:20]


def cached_executable(key: str | None = None) -> Path:
    return CACHE / (key or build_key()) / EXE_NAME


def build(out: Path | None = None, *, force: bool = False, log: Callable[[str], None] = print) -> Path:
    """The executable for the current sources (built if not cached); copied to ``out`` if given."""
    key = build_key()
    exe = cached_executable(key)
    if force or not exe.is_file():
        started = time.monotonic()
        log(f"building {EXE_NAME} with PyInstaller (cache key {key}); this takes a few minutes")
        work = CACHE / "work"
        staging = CACHE / f"{key}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        env = {**os.environ, "SOVEREIGN_REPO": str(REPO)}
        proc = subprocess.run([sys.executable, "-m", "PyInstaller", "--noconfirm", "--log-level", "WARN",
                               "--distpath", str(staging), "--workpath", str(work), str(SPEC)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if proc.returncode != 0 or not (staging / EXE_NAME).is_file():
            raise RuntimeError(f"PyInstaller failed with exit code {proc.returncode}:\n{proc.stderr[-6000:]}")
        exe.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / EXE_NAME, exe)
        shutil.rmtree(staging, ignore_errors=True)
        for old in CACHE.iterdir():  # keep the cache to the current build and the work directory
            if old.is_dir() and old.name not in (key, "work"):
                shutil.rmtree(old, ignore_errors=True)
        log(f"built {exe} ({exe.stat().st_size / 2**20:.1f} MiB) in {time.monotonic() - started:.0f} s")
    if out is None:
        return exe
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.copy2(exe, tmp)
    os.replace(tmp, out)
    return out
