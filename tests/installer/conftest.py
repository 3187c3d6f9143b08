"""Fixtures for installer tests: real keys, real signed bundles of a tiny synthetic model
(placeholder files are enough: the installer never loads the model), real ansible runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from airgap_bundle import build_bundle, init_keys
from policies import default_policy_dir

MODEL_MARKER = b"SAFETENSORS-PLACEHOLDER-0123456789"
REPO = Path(__file__).resolve().parents[2]

BundleFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    keydir = tmp_path_factory.mktemp("keys")
    init_keys(keydir)
    return keydir


@pytest.fixture(scope="session")
def trusted_root(keys: Path) -> Path:
    return keys / "root.json"


def make_model(path: Path, marker: bytes = MODEL_MARKER) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    (path / "model.safetensors").write_bytes(marker + b"\0" * 64)
    (path / "tokenizer.json").write_text("{}")
    return path


@pytest.fixture(scope="session")
def bundle_factory(tmp_path_factory: pytest.TempPathFactory, keys: Path) -> BundleFactory:
    """make(version, marker=..., policies="default" | dir | None) -> a signed bundle; metadata versions grow with
    each call so later bundles pass rollback protection."""
    counter = iter(range(1, 1000))
    base = int(datetime.now(UTC).timestamp())

    def make(version: str, *, marker: bytes = MODEL_MARKER, policies: Path | str | None = "default") -> Path:
        n = next(counter)
        work = tmp_path_factory.mktemp(f"bundle-{version}-")
        model = make_model(work / "SmolLM2-tiny", marker)
        policies_dir = default_policy_dir() if policies == "default" else (Path(policies) if policies else None)
        return build_bundle(work / f"appliance-{version}.tar", keys, version,
                            datetime.now(UTC) + timedelta(days=30), model_dir=model,
                            policies_dir=policies_dir, metadata_version=base + n)

    return make


@pytest.fixture(scope="session")
def bundle_v1(bundle_factory: BundleFactory) -> Path:
    return bundle_factory("0.1.0")


def tamper(bundle: Path, dest: Path, old: bytes = MODEL_MARKER) -> Path:
    """A copy of ``bundle`` with one byte of the model file flipped (tar headers stay valid)."""
    data = bundle.read_bytes()
    assert data.count(old) == 1, "marker must occur exactly once in the bundle"
    dest.write_bytes(data.replace(old, old[:-1] + b"X"))
    return dest


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real CLI in a child process, as an admin's shell would run it."""
    return subprocess.run([sys.executable, "-m", "installer.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=600)


def tree_snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """path -> (mode, size, link target or mtime) for everything under root."""
    snap = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        extra = os.readlink(path) if path.is_symlink() else str(st.st_mtime_ns)
        snap[str(path.relative_to(root))] = (st.st_mode, st.st_size, extra)
    return snap
