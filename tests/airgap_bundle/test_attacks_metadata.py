"""Attacks on the signed metadata, one role at a time: each rejection names its check and its file.

The bundles here are re-signed with the real keys after one edit (``conftest.resign``), so the
hash chain is intact and the only defect is the one under test.
"""

from __future__ import annotations

import copy
import tarfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root

from airgap_bundle import commit_trust, init_keys, rotate_keys, verify_bundle
from airgap_bundle.keys import load_root, load_signers
from airgap_bundle.report import CheckResult, VerificationReport
from tests.airgap_bundle.conftest import CREATED, read_members, resign, write_members

PAST = datetime(2021, 1, 1, tzinfo=UTC)
SIGNATURE_CHECK = {"timestamp": 3, "snapshot": 4, "targets": 5}


def failure(report: VerificationReport) -> CheckResult:
    failed = report.first_failure()
    assert failed is not None and not report.ok, "expected the bundle to be rejected"
    return failed


def _set(field: str, value: Any) -> Callable[[Any], None]:
    return lambda signed: setattr(signed, field, value)


def test_resigned_bundle_without_edits_still_verifies(bundle: Path, keydir: Path, tmp_path: Path) -> None:
    """The helper itself leaves no defect: every failure below comes from its one edit."""
    assert verify_bundle(resign(bundle, tmp_path / "same.tar", keydir), keydir / "root.json").ok


@pytest.mark.parametrize("role", ["timestamp", "snapshot", "targets"])
def test_expired_role_alone_is_a_freeze_attack(role: str, bundle: Path, keydir: Path, tmp_path: Path) -> None:
    bad = resign(bundle, tmp_path / "bad.tar", keydir, edit={role: _set("expires", PAST)})
    failed = failure(verify_bundle(bad, keydir / "root.json"))
    assert failed.number == 6 and failed.path == f"metadata/{role}.json"
    assert f"expected {role} to expire after now" in failed.detail
    assert "found expiry 2021-01-01T00:00:00Z" in failed.detail


def test_expired_root_is_refused(build: Callable[..., Path], tmp_path: Path) -> None:
    keys = tmp_path / "short-keys"
    init_keys(keys, root_expires=PAST)
    failed = failure(verify_bundle(build("b.tar", keys=keys), keys / "root.json"))
    assert failed.number == 6 and failed.path == "metadata/root.json" and "expected root to expire" in failed.detail


def test_now_in_the_past_cannot_revive_an_expired_bundle(bundle: Path, keydir: Path, tmp_path: Path) -> None:
    bad = resign(bundle, tmp_path / "bad.tar", keydir, edit={"timestamp": _set("expires", PAST)})
    failed = failure(verify_bundle(bad, keydir / "root.json", now=datetime(2020, 6, 1, tzinfo=UTC)))
    assert failed.number == 6 and failed.path == "metadata/timestamp.json"


@pytest.fixture
def keys_2_of_2(tmp_path: Path) -> Path:
    keys = tmp_path / "k22"
    init_keys(keys, thresholds={"timestamp": 2, "snapshot": 2, "targets": 2},
              counts={"timestamp": 2, "snapshot": 2, "targets": 2}, root_expires=CREATED + timedelta(days=3650))
    return keys


@pytest.mark.parametrize("role", ["timestamp", "snapshot", "targets"])
def test_under_threshold_signatures_per_role(role: str, keys_2_of_2: Path, build: Callable[..., Path],
                                             tmp_path: Path) -> None:
    good = build("good.tar", keys=keys_2_of_2)
    assert verify_bundle(good, keys_2_of_2 / "root.json").ok
    one_key = load_signers(keys_2_of_2, role, load_root(keys_2_of_2).signed)[:1]
    bad = resign(good, tmp_path / "bad.tar", keys_2_of_2, signers={role: one_key})
    failed = failure(verify_bundle(bad, keys_2_of_2 / "root.json"))
    assert failed.number == SIGNATURE_CHECK[role] and failed.path == f"metadata/{role}.json"
    assert f"expected >= 2 valid signature(s) from {role} keys" in failed.detail and "found 1" in failed.detail


@pytest.mark.parametrize("role", ["timestamp", "snapshot", "targets"])
def test_wrong_key_per_role(role: str, bundle: Path, keydir: Path, tmp_path: Path) -> None:
    bad = resign(bundle, tmp_path / "bad.tar", keydir, signers={role: [CryptoSigner.generate_ed25519()]})
    failed = failure(verify_bundle(bad, keydir / "root.json"))
    assert failed.number == SIGNATURE_CHECK[role] and failed.path == f"metadata/{role}.json"
    assert "found 0" in failed.detail


@pytest.mark.parametrize("role", ["snapshot", "targets"])
def test_rollback_of_one_role_behind_a_newer_timestamp(role: str, build: Callable[..., Path], keydir: Path,
                                                       tmp_path: Path) -> None:
    first = build("first.tar")
    state = tmp_path / "state"
    report = verify_bundle(first, keydir / "root.json", state)
    commit_trust(report, state)
    later = build("later.tar", created=CREATED + timedelta(days=1))
    bad = resign(later, tmp_path / "bad.tar", keydir, edit={role: _set("version", report.versions[role] - 1)})
    failed = failure(verify_bundle(bad, keydir / "root.json", state))
    assert failed.number == 7 and failed.path == f"metadata/{role}.json"
    assert f"expected {role} version >= {report.versions[role]}" in failed.detail


def test_old_bundle_after_a_key_rotation_is_refused(build: Callable[..., Path], keydir: Path,
                                                    tmp_path: Path) -> None:
    old = build("old.tar")
    rotate_keys(keydir, ["root", "timestamp"])
    new = build("new.tar", created=CREATED + timedelta(days=1))
    state = tmp_path / "state"
    commit_trust(verify_bundle(new, keydir / "1.root.json", state), state)
    failed = failure(verify_bundle(old, keydir / "1.root.json", state))  # state's root v2 wins over v1
    assert failed.number == 3 and failed.path == "metadata/timestamp.json" and "root v2" in failed.detail


# --- root rotation -------------------------------------------------------------------------------------------


def _next_root(keydir: Path, *, old_signers: int, new_signers: int, version: int = 2) -> tuple[bytes, Path]:
    """Root v2 with fresh root keys (threshold 2 of 3), signed by the first ``old_signers`` old root
    keys and ``new_signers`` new ones; returns its bytes and the v1 root file."""
    old = load_root(keydir)
    new = Root.from_dict(copy.deepcopy(old.signed.to_dict()))  # to_dict shares the keyid lists
    new.version = version
    for keyid in list(new.roles["root"].keyids):
        new.revoke_key(keyid, "root")
    fresh = [CryptoSigner.generate_ed25519() for _ in range(3)]
    for signer in fresh:
        new.add_key(signer.public_key, "root")
    md = Metadata(new)
    for signer in load_signers(keydir, "root", old.signed)[:old_signers] + fresh[:new_signers]:
        md.sign(signer, append=True)
    return md.to_bytes(), keydir / "root.json"


def _add_root(bundle: Path, dst: Path, root_bytes: bytes) -> Path:
    """``bundle`` carrying ``root_bytes`` as metadata/2.root.json and metadata/root.json."""
    members = [(info, root_bytes if info.name == "metadata/root.json" else data)
               for info, data in read_members(bundle)]
    members.append((tarfile.TarInfo("metadata/2.root.json"), root_bytes))
    return write_members(dst, members)


@pytest.mark.parametrize(("old_signers", "new_signers", "found"), [(0, 3, "found 0"), (1, 3, "found 1")])
def test_root_rotation_without_the_old_threshold(old_signers: int, new_signers: int, found: str, bundle: Path,
                                                 keydir: Path, tmp_path: Path) -> None:
    root_v2, trusted = _next_root(keydir, old_signers=old_signers, new_signers=new_signers)
    bad = _add_root(bundle, tmp_path / "bad.tar", root_v2)
    failed = failure(verify_bundle(bad, trusted))
    assert failed.number == 2 and failed.path == "metadata/2.root.json"
    assert "expected >= 2 valid signature(s) from root keys of root v1" in failed.detail and found in failed.detail


def test_root_rotation_without_the_new_threshold(bundle: Path, keydir: Path, tmp_path: Path) -> None:
    root_v2, trusted = _next_root(keydir, old_signers=2, new_signers=1)
    bad = _add_root(bundle, tmp_path / "bad.tar", root_v2)
    failed = failure(verify_bundle(bad, trusted))
    assert failed.number == 2 and failed.path == "metadata/2.root.json"
    assert "from root keys of root v2" in failed.detail and "found 1" in failed.detail


def test_root_rotation_with_a_wrong_version_inside(bundle: Path, keydir: Path, tmp_path: Path) -> None:
    root_v3, trusted = _next_root(keydir, old_signers=2, new_signers=2, version=3)
    bad = _add_root(bundle, tmp_path / "bad.tar", root_v3)
    failed = failure(verify_bundle(bad, trusted))
    assert failed.number == 2 and failed.path == "metadata/2.root.json" and "expected root version 2" in failed.detail


def test_properly_rotated_root_verifies(bundle: Path, keydir: Path, tmp_path: Path) -> None:
    """Control: the same construction signed by both thresholds passes check 2."""
    root_v2, trusted = _next_root(keydir, old_signers=2, new_signers=2)
    report = verify_bundle(_add_root(bundle, tmp_path / "ok.tar", root_v2), trusted)
    assert report.checks[1].passed and "v1 -> v2" in report.checks[1].detail
