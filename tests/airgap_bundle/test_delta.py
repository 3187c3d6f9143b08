"""Delta bundles: unchanged targets stay signed in targets.json but travel only in the base release."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from airgap_bundle import unpack_bundle, verify_bundle
from tests.airgap_bundle.conftest import CREATED, Inputs, member_data, read_members


@pytest.fixture
def releases(build: Callable[..., Path], keydir: Path, inputs: Inputs, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(base release dir, full v2 bundle, delta v2 bundle)."""
    full_v1 = build("v1.tar")
    base = tmp_path / "release-v1"
    unpack_bundle(full_v1, base, verify_bundle(full_v1, keydir / "root.json"))
    (inputs.policies / "tenants.yaml").write_text("tenants: {acme: {}}\n")
    later = CREATED + timedelta(days=1)
    full_v2 = build("v2-full.tar", created=later)
    delta_v2 = build("v2-delta.tar", created=later, base_manifest=base / "manifest.json")
    return base, full_v2, delta_v2


def test_delta_leaves_out_unchanged_files_but_signs_them(releases: tuple[Path, Path, Path]) -> None:
    _, full, delta = releases
    names = {info.name for info, _ in read_members(delta)}
    assert "targets/model/model.safetensors" not in names
    assert "targets/policies/tenants.yaml" in names and "targets/manifest.json" in names
    manifest = json.loads(member_data(delta, "targets/manifest.json"))
    assert "model/model.safetensors" in manifest["delta"]["omitted"]
    assert "policies/tenants.yaml" not in manifest["delta"]["omitted"]
    assert delta.stat().st_size < full.stat().st_size


def test_delta_without_base_fails_as_missing_files(releases: tuple[Path, Path, Path], keydir: Path) -> None:
    _, _, delta = releases
    failed = verify_bundle(delta, keydir / "root.json").first_failure()
    assert failed is not None and failed.number == 8 and "base release" in failed.detail


def test_delta_with_base_verifies_and_unpacks_like_the_full_bundle(releases: tuple[Path, Path, Path],
                                                                     keydir: Path, tmp_path: Path) -> None:
    base, full, delta = releases
    report = verify_bundle(delta, keydir / "root.json", base_dir=base)
    assert report.ok, report.first_failure()
    assert "model/model.safetensors" in report.from_base
    unpack_bundle(delta, tmp_path / "v2-from-delta", report)
    unpack_bundle(full, tmp_path / "v2-from-full", verify_bundle(full, keydir / "root.json"))
    for path in report.targets:
        if path == "manifest.json" or path == "sbom.cdx.json":
            continue
        assert (tmp_path / "v2-from-delta" / path).read_bytes() == (tmp_path / "v2-from-full" / path).read_bytes()


def test_tampered_base_file_is_caught(releases: tuple[Path, Path, Path], keydir: Path) -> None:
    base, _, delta = releases
    target = base / "model" / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[100] ^= 0x01
    target.write_bytes(bytes(data))
    failed = verify_bundle(delta, keydir / "root.json", base_dir=base).first_failure()
    assert failed is not None and failed.number == 8 and failed.path == "model/model.safetensors"
    assert "in the base release" in failed.detail


def test_symlinked_base_file_is_refused(releases: tuple[Path, Path, Path], keydir: Path, tmp_path: Path) -> None:
    base, _, delta = releases
    target = base / "model" / "model.safetensors"
    moved = tmp_path / "elsewhere.safetensors"
    os.replace(target, moved)
    os.symlink(moved, target)
    failed = verify_bundle(delta, keydir / "root.json", base_dir=base).first_failure()
    assert failed is not None and failed.number == 8 and "link" in failed.detail


def test_base_changed_after_verification_aborts_unpack(releases: tuple[Path, Path, Path], keydir: Path,
                                                       tmp_path: Path) -> None:
    from airgap_bundle import UnpackError

    base, _, delta = releases
    report = verify_bundle(delta, keydir / "root.json", base_dir=base)
    assert report.ok
    (base / "model" / "model.safetensors").write_bytes(b"\x07" * 4096)
    with pytest.raises(UnpackError, match=r"model\.safetensors"):
        unpack_bundle(delta, tmp_path / "v2", report)
    assert not (tmp_path / "v2").exists()


def test_longer_base_file_is_refused_before_reading(releases: tuple[Path, Path, Path], keydir: Path) -> None:
    base, _, delta = releases
    with open(base / "model" / "model.safetensors", "ab") as extra:
        extra.write(b"#!/bin/sh\n")
    failed = verify_bundle(delta, keydir / "root.json", base_dir=base).first_failure()
    assert failed is not None and failed.number == 8 and failed.path == "model/model.safetensors"
    assert "expected 4096 bytes in the base release, found 4106" in failed.detail


def test_large_base_file_is_verified_by_chunks(build: Callable[..., Path], keydir: Path, inputs: Inputs,
                                               tmp_path: Path) -> None:
    (inputs.model / "model.safetensors").write_bytes(b"\x05" * (3 * 1024 * 1024 + 7))
    v1 = build("v1.tar", chunk_bytes=1024 * 1024)
    base = tmp_path / "release-v1"
    unpack_bundle(v1, base, verify_bundle(v1, keydir / "root.json"))
    (inputs.policies / "tenants.yaml").write_text("tenants: {acme: {}}\n")
    delta = build("v2.tar", created=CREATED + timedelta(days=1), base_manifest=base / "manifest.json",
                  chunk_bytes=1024 * 1024)
    report = verify_bundle(delta, keydir / "root.json", base_dir=base, workers=2)
    assert report.ok, report.first_failure()
    assert "model/model.safetensors" in report.from_base and "1 large target(s)" in report.checks[7].detail
    data = bytearray((base / "model" / "model.safetensors").read_bytes())
    data[2 * 1024 * 1024] ^= 1
    (base / "model" / "model.safetensors").write_bytes(bytes(data))
    failed = verify_bundle(delta, keydir / "root.json", base_dir=base).first_failure()
    assert failed is not None and failed.number == 8 and failed.path == "model/model.safetensors"
    assert "chunk 2" in failed.detail and "in the base release" in failed.detail
