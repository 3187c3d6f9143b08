from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from airgap_bundle import TrustStateError, UnpackError, commit_trust, unpack_bundle, verify_bundle
from airgap_bundle.trust_state import load_state
from tests.airgap_bundle.conftest import Inputs


def test_unpack_writes_exactly_the_signed_targets(bundle: Path, keydir: Path, tmp_path: Path,
                                                   inputs: Inputs) -> None:
    report = verify_bundle(bundle, keydir / "root.json")
    dest = tmp_path / "release"
    written = unpack_bundle(bundle, dest, report)
    assert sorted(p.relative_to(dest).as_posix() for p in written) == sorted(report.targets)
    assert (dest / "model" / "model.safetensors").read_bytes() == (inputs.model / "model.safetensors").read_bytes()
    on_disk = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert on_disk == sorted(report.targets)
    assert not list(tmp_path.glob(".release.staging-*"))


def test_unpack_refuses_a_failed_report(bundle: Path, tmp_path: Path) -> None:
    report = verify_bundle(bundle, tmp_path / "no-root.json")
    with pytest.raises(UnpackError, match="failed check 2"):
        unpack_bundle(bundle, tmp_path / "release", report)
    assert not (tmp_path / "release").exists()


def test_unpack_is_atomic_when_the_bundle_changes_after_verification(bundle: Path, keydir: Path,
                                                                      tmp_path: Path) -> None:
    report = verify_bundle(bundle, keydir / "root.json")
    data = bytearray(bundle.read_bytes())
    needle = b"tenants: {}"
    at = data.index(needle)
    data[at : at + len(needle)] = b"tenants: {!"  # same length, different bytes, in place
    bundle.write_bytes(bytes(data))
    dest = tmp_path / "release"
    with pytest.raises(UnpackError, match=r"tenants\.yaml"):
        unpack_bundle(bundle, dest, report)
    assert not dest.exists()
    assert not list(tmp_path.glob(".release.*"))


def test_unpack_refuses_non_empty_destination(bundle: Path, keydir: Path, tmp_path: Path) -> None:
    report = verify_bundle(bundle, keydir / "root.json")
    dest = tmp_path / "release"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(UnpackError, match="absent or empty"):
        unpack_bundle(bundle, dest, report)
    assert (dest / "keep.txt").read_text() == "mine"


def test_commit_trust_persists_versions_atomically_with_private_dir(bundle: Path, keydir: Path,
                                                                     tmp_path: Path) -> None:
    state = tmp_path / "state"
    report = verify_bundle(bundle, keydir / "root.json", state)
    path = commit_trust(report, state)
    saved = json.loads(path.read_text())
    assert saved["timestamp"] == report.versions["timestamp"] and saved["digest"] == report.digest
    assert load_state(state)["targets"] == report.versions["targets"]
    assert (state / "root.json").read_bytes() == (keydir / "root.json").read_bytes()
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert not [p for p in state.iterdir() if p.name.endswith(".tmp")]


def test_commit_trust_refuses_a_failed_report(bundle: Path, tmp_path: Path) -> None:
    report = verify_bundle(bundle, tmp_path / "no-root.json")
    with pytest.raises(TrustStateError, match="failed report"):
        commit_trust(report, tmp_path / "state")
    assert not (tmp_path / "state").exists()
