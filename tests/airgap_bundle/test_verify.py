from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from airgap_bundle import CHECKS, VerificationError, rotate_keys, verify_bundle
from airgap_bundle.layout import Limits
from tests.airgap_bundle.conftest import repack


def test_good_bundle_passes_every_check_in_order(bundle: Path, keydir: Path) -> None:
    report = verify_bundle(bundle, keydir / "root.json")
    assert report.ok, report.first_failure()
    assert [(c.number, c.name) for c in report.checks] == list(CHECKS)
    assert all(c.passed for c in report.checks)
    assert report.name == "sovereign-appliance" and report.version == "0.1.0"
    assert report.digest.startswith("sha256:") and len(report.digest) == 71
    assert report.targets["model/model.safetensors"].length == 4096
    assert set(report.versions) == {"root", "timestamp", "snapshot", "targets"}
    report.raise_for_failure()


def test_failed_report_raises_first_failure_and_skips_the_rest(bundle: Path, tmp_path: Path) -> None:
    report = verify_bundle(bundle, tmp_path / "missing-root.json")
    assert not report.ok
    assert report.checks[1].passed is False and not report.checks[1].skipped
    assert all(c.skipped for c in report.checks[2:])
    with pytest.raises(VerificationError) as info:
        report.raise_for_failure()
    assert info.value.check == "2 root chain"


def test_root_rotation_chain_verifies_from_the_original_root(build: Callable[..., Path], keydir: Path,
                                                             tmp_path: Path) -> None:
    original = tmp_path / "root-v1.json"
    original.write_bytes((keydir / "root.json").read_bytes())
    rotate_keys(keydir, ["root", "timestamp"])
    bundle = build("rotated.tar")
    report = verify_bundle(bundle, original)
    assert report.ok, report.first_failure()
    assert report.versions["root"] == 2
    assert "v1 -> v2" in report.checks[1].detail


def test_broken_root_chain_fails_check_2(build: Callable[..., Path], keydir: Path, tmp_path: Path) -> None:
    original = tmp_path / "root-v1.json"
    original.write_bytes((keydir / "root.json").read_bytes())
    rotate_keys(keydir, ["timestamp"])
    bundle = build("rotated.tar")
    cut = repack(bundle, tmp_path / "cut.tar",
                 lambda ms: ms.__setitem__(slice(None), [m for m in ms if m[0].name != "metadata/2.root.json"]))
    failure = verify_bundle(cut, original).first_failure()
    assert failure is not None and failure.number == 2
    assert "metadata/2.root.json" in failure.detail


def test_parallel_and_serial_verification_agree(bundle: Path, keydir: Path) -> None:
    serial = verify_bundle(bundle, keydir / "root.json", workers=1)
    parallel = verify_bundle(bundle, keydir / "root.json", workers=4)
    assert serial.ok and parallel.ok and serial.targets == parallel.targets


def test_member_limit_is_configuration(bundle: Path, keydir: Path) -> None:
    failure = verify_bundle(bundle, keydir / "root.json", limits=Limits(max_members=3)).first_failure()
    assert failure is not None and failure.number == 1 and "at most 3 members" in failure.detail
