"""Bundles carrying several models: layout (the default model under model/, the others under
models/<name>/), the signed manifest and SBOM listing each, inspect, names that must be valid and
unique, and delta bundles that leave an unchanged model out. Small synthetic models (fast); the
real SmolLM2 model goes through the CLI in test_two_real_models_build_verify_and_inspect_with_the_cli."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from airgap_bundle import BuildError, inspect_bundle, unpack_bundle, verify_bundle
from airgap_bundle.bundle_models import models_in_manifest
from tests.airgap_bundle.conftest import CREATED, Inputs, member_data, read_members

REPO = Path(__file__).resolve().parents[2]


def make_model(path: Path, name: str | None, weights: bytes, license: str = "Apache-2.0") -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}\n')
    (path / "model.safetensors").write_bytes(weights)
    (path / "tokenizer.json").write_text("{}\n")
    if name is not None:
        (path / "airgap_model.json").write_text(json.dumps({"name": name, "license": license}))
    return path


@pytest.fixture
def second(tmp_path: Path) -> Path:
    return make_model(tmp_path / "inputs" / "second-dir", "Second-1B", b"\x02" * 4096, license="MIT")


def test_two_models_lie_under_model_and_models_name_and_are_signed(
        build: Callable[..., Path], second: Path, keydir: Path, tmp_path: Path) -> None:
    bundle = build(model_dirs=[second])
    report = verify_bundle(bundle, keydir / "root.json")
    assert report.ok, report.first_failure()
    assert {"model/model.safetensors", "models/Second-1B/model.safetensors",
            "models/Second-1B/airgap_model.json"} <= set(report.targets)
    manifest = json.loads(member_data(bundle, "targets/manifest.json"))
    assert [(m["name"], m["path"], m["license"]) for m in manifest["models"]] == [
        ("Tiny", "model", "Apache-2.0"), ("Second-1B", "models/Second-1B", "MIT")]
    assert manifest["models"][1]["files"] == ["airgap_model.json", "config.json", "model.safetensors",
                                              "tokenizer.json"]
    # the default model keeps the section every earlier reader of manifest.json knows
    assert manifest["model"]["name"] == "Tiny" and "model.safetensors" in manifest["model"]["files"]
    sbom = json.loads(member_data(bundle, "targets/sbom.cdx.json"))
    models = [c for c in sbom["components"] if c["type"] == "machine-learning-model"]
    assert [(m["name"], m["licenses"]) for m in models] == [
        ("Tiny", [{"license": {"id": "Apache-2.0"}}]), ("Second-1B", [{"license": {"id": "MIT"}}])]
    assert {f["name"] for f in models[1]["components"]} == {f"models/Second-1B/{f}" for f in
                                                            manifest["models"][1]["files"]}
    assert models[1]["hashes"] == [{"alg": "SHA-256", "content": report.targets[
        "models/Second-1B/model.safetensors"].sha256}]
    unpack_bundle(bundle, tmp_path / "out", report)
    assert (tmp_path / "out" / "models" / "Second-1B" / "model.safetensors").read_bytes() == b"\x02" * 4096
    assert [(m.name, m.path, len(m.files)) for m in models_in_manifest(manifest)] == [
        ("Tiny", "model", 4), ("Second-1B", "models/Second-1B", 4)]


def test_inspect_lists_every_model(build: Callable[..., Path], second: Path, inputs: Inputs) -> None:
    info = inspect_bundle(build(model_dirs=[second]))

    def size(d: Path) -> int:
        return sum(p.stat().st_size for p in d.iterdir())

    assert info["models"] == [
        {"name": "Tiny", "path": "model", "license": "Apache-2.0", "files": 4, "bytes": size(inputs.model)},
        {"name": "Second-1B", "path": "models/Second-1B", "license": "MIT", "files": 4, "bytes": size(second)}]
    assert [m["name"] for m in info["sbom"]["models"]] == ["Tiny", "Second-1B"]


def test_one_model_keeps_the_layout_and_manifest_earlier_releases_read(build: Callable[..., Path]) -> None:
    manifest = json.loads(member_data(build(), "targets/manifest.json"))
    assert manifest["schema"] == 1 and manifest["model"]["name"] == "Tiny"
    assert [m["path"] for m in manifest["models"]] == ["model"]
    old = {k: v for k, v in manifest.items() if k != "models"}  # a manifest written before `models` existed
    assert [(m.name, m.path) for m in models_in_manifest(old)] == [("Tiny", "model")]
    assert models_in_manifest({"model": None}) == []


@pytest.mark.parametrize(("name", "expected"), [
    ("Tiny", "expected a unique model name per bundle, found 'Tiny' also for"),
    ("../etc", "expected a model name of letters, digits, '.', '_' or '-' (at most 128, from airgap_model.json or "
               "the directory name), found '../etc'"),
    ("org/model", "found 'org/model'"),
])
def test_model_names_must_be_valid_and_unique(build: Callable[..., Path], tmp_path: Path, name: str,
                                              expected: str) -> None:
    other = make_model(tmp_path / "other", name, b"\x03" * 10)
    with pytest.raises(BuildError, match="^" + str(other).replace(".", r"\.") + ": ") as info:
        build(model_dirs=[other])
    assert expected in str(info.value)
    assert not list(tmp_path.glob("b.tar*")) and not list(tmp_path.glob(".b.tar*"))


def test_name_falls_back_to_the_directory_name(build: Callable[..., Path], tmp_path: Path) -> None:
    unnamed = make_model(tmp_path / "Qwen2-0.5B", None, b"\x04" * 10)
    manifest = json.loads(member_data(build(model_dirs=[unnamed]), "targets/manifest.json"))
    assert [m["path"] for m in manifest["models"]] == ["model", "models/Qwen2-0.5B"]
    assert manifest["models"][1]["license"] == "NOASSERTION"


def test_manifest_models_that_do_not_fit_the_layout_are_refused() -> None:
    good = {"name": "A", "path": "model", "files": ["w"]}
    for models, expected in [
        ("A", "expected models to be a list"),
        ([{**good, "path": "models/B"}], "expected model name and path like 'X' at model or models/X, found 'A' at "
                                         "'models/B'"),
        ([{**good, "path": "../x"}], "found 'A' at '../x'"),
        ([good, {**good, "path": "models/A"}], "expected unique model names, found 'A' twice"),
        ([{**good, "files": [""]}], "expected model 'A' files as non-empty strings"),
        ([{"name": "A"}], "expected each model entry to have name, path and files"),
    ]:
        with pytest.raises(ValueError) as info:
            models_in_manifest({"models": models})
        assert expected in str(info.value)


def test_delta_leaves_out_an_unchanged_model_and_ships_a_changed_one(
        build: Callable[..., Path], second: Path, inputs: Inputs, keydir: Path, tmp_path: Path) -> None:
    v1 = build("v1.tar", model_dirs=[second])
    base = tmp_path / "release-v1"
    unpack_bundle(v1, base, verify_bundle(v1, keydir / "root.json"))
    (second / "model.safetensors").write_bytes(b"\x05" * 4096)  # the second model changes, Tiny does not
    third = make_model(tmp_path / "third", "Third", b"\x06" * 100)  # and a model is added
    delta = build("v2-delta.tar", created=CREATED + timedelta(days=1), base_manifest=base / "manifest.json",
                  model_dirs=[second, third])
    names = {info.name for info, _ in read_members(delta)}
    assert "targets/model/model.safetensors" not in names and "targets/model/config.json" not in names
    assert {"targets/models/Second-1B/model.safetensors", "targets/models/Third/model.safetensors"} <= names
    assert "targets/models/Second-1B/config.json" not in names  # unchanged file of a changed model
    report = verify_bundle(delta, keydir / "root.json", base_dir=base)
    assert report.ok, report.first_failure()
    unpack_bundle(delta, tmp_path / "v2", report)
    assert (tmp_path / "v2" / "model" / "model.safetensors").read_bytes() == b"\x00" * 4096
    assert (tmp_path / "v2" / "models" / "Second-1B" / "model.safetensors").read_bytes() == b"\x05" * 4096


def _real_model() -> Path:
    path = Path(os.environ.get("SOVEREIGN_MODEL_DIR", ""))
    if not (path / "model.safetensors").is_file():
        pytest.skip("SOVEREIGN_MODEL_DIR does not name the converted SmolLM2 model directory")
    return path


def same_weights_other_name(real: Path, dest: Path, name: str) -> Path:
    """A second model directory for packaging tests: the real model's files (hard links where the
    filesystem allows, else copies) under another name in airgap_model.json. Honest for packaging:
    the bundle and installer treat it as a distinct model; nobody claims it is a different network."""
    dest.mkdir(parents=True)
    for src in real.iterdir():
        if src.name == "airgap_model.json":
            info = json.loads(src.read_text())
            (dest / src.name).write_text(json.dumps({**info, "name": name}))
            continue
        try:
            os.link(src, dest / src.name)
        except OSError:
            shutil.copyfile(src, dest / src.name)
    return dest


def test_two_real_models_build_verify_and_inspect_with_the_cli(keydir: Path, tmp_path: Path) -> None:
    real = _real_model()
    second = same_weights_other_name(real, tmp_path / "second", "SmolLM2-135M-Copy")

    def cli(*args: str) -> Any:
        proc = subprocess.run([sys.executable, "-m", "airgap_bundle.cli", *args, "--json"], capture_output=True,
                              text=True, cwd=REPO, timeout=600)
        assert proc.returncode == 0, proc.stderr
        return dict(json.loads(proc.stdout))

    built = cli("build", "--keys", str(keydir), "--version", "1.0.0", "--out", str(tmp_path / "b.tar"),
                "--model", str(real), "--model", str(second))
    report = cli("verify", str(built["bundle"]), "--root", str(keydir / "root.json"))
    assert report["ok"] is True
    info = cli("inspect", str(built["bundle"]))
    weights = (real / "model.safetensors").stat().st_size
    assert [(m["name"], m["path"], m["license"]) for m in info["models"]] == [
        ("SmolLM2-135M-Instruct", "model", "Apache-2.0"), ("SmolLM2-135M-Copy", "models/SmolLM2-135M-Copy",
                                                            "Apache-2.0")]
    assert all(m["bytes"] > weights for m in info["models"])
    assert info["targets"]["models/SmolLM2-135M-Copy/model.safetensors"] == weights
    duplicate = subprocess.run([sys.executable, "-m", "airgap_bundle.cli", "build", "--keys", str(keydir),
                                "--version", "1.0.1", "--out", str(tmp_path / "dup.tar"), "--model", str(real),
                                "--model", str(real)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert duplicate.returncode == 2
    assert "expected a unique model name per bundle, found 'SmolLM2-135M-Instruct'" in " ".join(
        duplicate.stderr.split())
