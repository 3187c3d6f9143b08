from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from airgap_bundle import CHECKS, VerificationError, rotate_keys, unpack_bundle, verify_bundle
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


def _tampered(bundle: Path, tmp_path: Path) -> Path:
    def edit(members: list) -> None:
        for i, (info, data) in enumerate(members):
            if info.name == "targets/model/model.safetensors":
                members[i] = (info, b"\x01" + data[1:])

    return repack(bundle, tmp_path / "tampered.tar", edit)


@pytest.mark.parametrize("options", [
    {}, {"workers": 1}, {"workers": 16}, {"limits": Limits(max_members=10**9, max_metadata_bytes=2**40)},
    {"now": datetime(1990, 1, 1, tzinfo=UTC)}, {"progress": None}, {"base_dir": None}, {"state_dir": None},
])
def test_no_optional_argument_skips_a_check(options: dict, bundle: Path, keydir: Path, tmp_path: Path) -> None:
    good = verify_bundle(bundle, keydir / "root.json", **options)
    assert good.ok and [c.number for c in good.checks if c.passed and not c.skipped] == list(range(1, 9))
    bad = verify_bundle(_tampered(bundle, tmp_path), keydir / "root.json", **options)
    failed = bad.first_failure()
    assert not bad.ok and failed is not None and failed.number == 8


def test_a_base_directory_does_not_excuse_a_target_in_the_tar(bundle: Path, keydir: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    unpack_bundle(bundle, base, verify_bundle(bundle, keydir / "root.json"))
    failed = verify_bundle(_tampered(bundle, tmp_path), keydir / "root.json", base_dir=base).first_failure()
    assert failed is not None and failed.number == 8 and failed.path == "model/model.safetensors"


def test_rollback_check_says_when_it_had_no_state(bundle: Path, keydir: Path, tmp_path: Path) -> None:
    without = verify_bundle(bundle, keydir / "root.json")
    assert without.ok and not without.rollback_checked and without.checks[6].detail.startswith("NOT CHECKED")
    with_state = verify_bundle(bundle, keydir / "root.json", tmp_path / "state")
    assert with_state.ok and with_state.rollback_checked


def test_cli_has_no_option_that_skips_verification() -> None:
    from typer.main import get_command

    from airgap_bundle.cli import app

    group = get_command(app)
    for name in ("verify", "unpack"):
        command = group.commands[name]  # type: ignore[attr-defined]
        options = {opt for param in command.params for opt in param.opts + param.secondary_opts}
        assert not {o for o in options if any(w in o for w in ("skip", "no-verify", "insecure", "force", "trust"))}
