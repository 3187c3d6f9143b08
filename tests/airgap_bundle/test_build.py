from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from airgap_bundle import BuildError, KeyManagementError
from tests.airgap_bundle.conftest import CREATED, Inputs, member_data

GENERATED = ["targets/sbom.cdx.json", "targets/manifest.json"]
METADATA = ["metadata/1.root.json", "metadata/root.json", "metadata/snapshot.json", "metadata/targets.json",
            "metadata/timestamp.json"]


def test_same_inputs_give_same_bytes(build: Callable[..., Path]) -> None:
    first = build("one.tar")
    second = build("two.tar")
    assert first.read_bytes() == second.read_bytes()
    later = build("three.tar", created=CREATED + timedelta(seconds=1))
    assert later.read_bytes() != first.read_bytes()


def test_same_inputs_give_same_bytes_with_chunk_hashes(build: Callable[..., Path], inputs: Inputs) -> None:
    (inputs.model / "model.safetensors").write_bytes(os.urandom(1024 * 1024) * 3)
    first = build("one.tar", chunk_bytes=1024 * 1024)
    assert first.read_bytes() == build("two.tar", chunk_bytes=1024 * 1024, workers=1).read_bytes()
    targets = json.loads(member_data(first, "metadata/targets.json"))["signed"]["targets"]
    chunks = targets["model/model.safetensors"]["custom"]["sha256_chunks"]
    assert chunks["chunk_size"] == 1024 * 1024 and len(set(chunks["sha256"])) == 1 and len(chunks["sha256"]) == 3
    assert "custom" not in targets["model/config.json"]


def test_chunk_size_below_the_minimum_is_a_value_error(build: Callable[..., Path]) -> None:
    with pytest.raises(ValueError, match="chunk_bytes"):
        build(chunk_bytes=4096)


def test_tar_layout_is_payload_then_generated_then_metadata_with_fixed_metadata(bundle: Path) -> None:
    with tarfile.open(bundle, "r:") as tar:
        members = tar.getmembers()
        assert tar.pax_headers == {}
    names = [m.name for m in members]
    payload = [n for n in names if n.startswith("targets/") and n not in GENERATED]
    assert names == [*sorted(payload), *GENERATED, *METADATA]
    assert "targets/model/model.safetensors" in names
    assert "targets/playbooks/roles/app/tasks/main.yml" in names
    for m in members:
        assert m.isreg() and m.mode == 0o644 and (m.uid, m.gid, m.uname, m.gname) == (0, 0, "", "")
        assert m.mtime == int(CREATED.timestamp())
    size = bundle.stat().st_size
    assert size % tarfile.RECORDSIZE == 0


def test_manifest_lists_sections_and_contents(bundle: Path) -> None:
    manifest = json.loads(member_data(bundle, "targets/manifest.json"))
    assert manifest["name"] == "sovereign-appliance" and manifest["version"] == "0.1.0"
    assert manifest["created"] == "2025-01-01T00:00:00Z"
    assert manifest["model"]["name"] == "Tiny"
    assert "model.safetensors" in manifest["model"]["files"]
    assert manifest["policies"] == ["tenants.yaml"]
    assert manifest["contents"]["model/model.safetensors"]["length"] == 4096
    assert "sbom.cdx.json" in manifest["contents"]


def test_sbom_is_cyclonedx_with_model_hashes_licence_and_wheels(bundle: Path) -> None:
    sbom = json.loads(member_data(bundle, "targets/sbom.cdx.json"))
    assert sbom["bomFormat"] == "CycloneDX" and sbom["specVersion"] == "1.5"
    assert sbom["serialNumber"].startswith("urn:uuid:")
    model = next(c for c in sbom["components"] if c["type"] == "machine-learning-model")
    assert model["name"] == "Tiny"
    assert model["licenses"] == [{"license": {"id": "Apache-2.0"}}]
    assert model["hashes"][0]["alg"] == "SHA-256" and len(model["hashes"][0]["content"]) == 64
    assert {f["name"] for f in model["components"]} >= {"model/config.json", "model/model.safetensors"}
    wheel = next(c for c in sbom["components"] if c["type"] == "library")
    assert wheel["name"] == "pyyaml" and wheel["version"] == "6.0.2" and wheel["purl"] == "pkg:pypi/pyyaml@6.0.2"


def test_symlink_input_is_refused(build: Callable[..., Path], inputs: Inputs) -> None:
    os.symlink("/etc/passwd", inputs.policies / "link.yaml")
    with pytest.raises(BuildError, match="symbolic link"):
        build()


def test_expiry_before_creation_is_refused(build: Callable[..., Path]) -> None:
    with pytest.raises(BuildError, match="expiry after creation"):
        build(expires=CREATED - timedelta(days=1))


def test_missing_signing_key_is_refused(build: Callable[..., Path], keydir: Path, tmp_path: Path) -> None:
    next((keydir / "private").glob("timestamp-*.pem")).unlink()
    with pytest.raises(KeyManagementError, match="timestamp"):
        build()
    assert not (tmp_path / "b.tar").exists()
    assert not list(tmp_path.glob(".b.tar.*"))


def test_no_inputs_is_refused(build: Callable[..., Path]) -> None:
    with pytest.raises(BuildError, match="at least one input"):
        build(model_dir=None, policies_dir=None, playbooks_dir=None, wheelhouse=None)
