"""Each attack on a bundle in its own test: which check catches it, and what the message says."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata

from airgap_bundle import commit_trust, init_keys, verify_bundle
from airgap_bundle.report import CheckResult, VerificationReport
from tests.airgap_bundle.conftest import CREATED, read_members, repack, write_members

Members = list[tuple[tarfile.TarInfo, bytes]]
MODEL = "targets/model/model.safetensors"


def failure(report: VerificationReport) -> CheckResult:
    failed = report.first_failure()
    assert failed is not None, "expected the bundle to be rejected"
    assert not report.ok
    return failed


def edit_member(name: str, change: Callable[[bytes], bytes]) -> Callable[[Members], None]:
    def edit(members: Members) -> None:
        for i, (info, data) in enumerate(members):
            if info.name == name:
                members[i] = (info, change(data))
                return
        raise KeyError(name)

    return edit


def add_member(info: tarfile.TarInfo, data: bytes = b"") -> Callable[[Members], None]:
    return lambda members: members.append((info, data))


def test_tampered_target_byte(bundle: Path, keydir: Path, tmp_path: Path) -> None:
    bad = repack(bundle, tmp_path / "bad.tar", edit_member(MODEL, lambda d: b"\x01" + d[1:]))
    failed = failure(verify_bundle(bad, keydir / "root.json"))
    assert failed.number == 8 and failed.path == "model/model.safetensors"
    assert "expected sha256" in failed.detail and "found" in failed.detail


def test_truncated_target(bundle: Path, keydir: Path, tmp_path: Path) -> None:
    bad = repack(bundle, tmp_path / "bad.tar", edit_member(MODEL, lambda d: d[:-10]))
    failed = failure(verify_bundle(bad, keydir / "root.json"))
    assert failed.number == 8 and failed.path == "model/model.safetensors"
    assert "expected 4096 bytes, found 4086" in failed.detail


def test_endless_data_member_longer_than_signed(bundle: Path, keydir: Path, tmp_path: Path) -> None:
    bad = repack(bundle, tmp_path / "bad.tar", edit_member(MODEL, lambda d: d + b"#!/bin/sh"))
    failed = failure(verify_bundle(bad, keydir / "root.json"))
    assert failed.number == 8 and failed.path == "model/model.safetensors"
    assert "expected 4096 bytes, found 4105" in failed.detail


def test_truncated_bundle_file(bundle: Path, keydir: Path, tmp_path: Path) -> None:
    data = bundle.read_bytes()
    bad = tmp_path / "bad.tar"
    bad.write_bytes(data[: len(data) // 2])
    failed = failure(verify_bundle(bad, keydir / "root.json"))
    assert failed.number == 1 and failed.path and "truncated" in failed.detail


def test_extra_unlisted_file(bundle: Path, keydir: Path, tmp_path: Path) -> None:
    bad = repack(bundle, tmp_path / "bad.tar", add_member(tarfile.TarInfo("targets/policies/evil.sh"), b"rm -rf /"))
    failed = failure(verify_bundle(bad, keydir / "root.json"))
    assert failed.number == 8 and failed.path == "targets/policies/evil.sh" and "unlisted" in failed.detail


def test_missing_file(bundle: Path, keydir: Path, tmp_path: Path) -> None:
    def drop(members: Members) -> None:
        members[:] = [m for m in members if m[0].name != "targets/policies/tenants.yaml"]

    failed = failure(verify_bundle(repack(bundle, tmp_path / "bad.tar", drop), keydir / "root.json"))
    assert failed.number == 8 and failed.path == "policies/tenants.yaml" and "found none" in failed.detail


def test_wrong_trusted_root(bundle: Path, tmp_path: Path) -> None:
    other = init_keys(tmp_path / "other-keys")
    failed = failure(verify_bundle(bundle, other))
    assert failed.number == 2 and failed.path == "metadata/root.json" and "metadata/root.json" in failed.detail


def test_bundle_signed_by_another_key_set_carrying_our_root(build: Callable[..., Path], keydir: Path,
                                                            tmp_path: Path) -> None:
    other_keys = tmp_path / "attacker-keys"
    init_keys(other_keys)
    forged = build("forged.tar", keys=other_keys)
    ours = {info.name: data for info, data in read_members(build("ours.tar"))}

    def swap_root(members: Members) -> None:
        for i, (info, _) in enumerate(members):
            if info.name in ("metadata/root.json", "metadata/1.root.json"):
                members[i] = (info, ours[info.name])

    bad = repack(forged, tmp_path / "bad.tar", swap_root)
    failed = failure(verify_bundle(bad, keydir / "root.json"))
    assert failed.number == 3 and "expected >= 1 valid signature(s) from timestamp keys" in failed.detail
    assert "found 0" in failed.detail and failed.path == "metadata/timestamp.json"


def test_under_threshold_signatures(tmp_path: Path, build: Callable[..., Path]) -> None:
    keys = tmp_path / "k2"
    init_keys(keys, thresholds={"timestamp": 2}, counts={"timestamp": 2})
    good = build("good.tar", keys=keys)
    assert verify_bundle(good, keys / "root.json").ok

    def drop_one_signature(data: bytes) -> bytes:
        md = Metadata.from_bytes(data)
        md.signatures.popitem()
        return md.to_bytes()

    bad = repack(good, tmp_path / "bad.tar", edit_member("metadata/timestamp.json", drop_one_signature))
    failed = failure(verify_bundle(bad, keys / "root.json"))
    assert failed.number == 3 and failed.path == "metadata/timestamp.json"
    assert "expected >= 2 valid signature(s)" in failed.detail and "found 1" in failed.detail


def test_forged_targets_metadata(bundle: Path, keydir: Path, tmp_path: Path) -> None:
    def forge_targets(data: bytes) -> bytes:
        doc = json.loads(data)
        doc["signed"]["targets"]["model/model.safetensors"]["length"] = 1
        return json.dumps(doc).encode()

    bad = repack(bundle, tmp_path / "bad.tar", edit_member("metadata/targets.json", forge_targets))
    failed = failure(verify_bundle(bad, keydir / "root.json"))
    assert failed.number == 5 and failed.path == "metadata/targets.json"  # hash no longer matches snapshot.json


def test_expired_metadata(build: Callable[..., Path], keydir: Path) -> None:
    old = build("old.tar", created=datetime(2020, 1, 1, tzinfo=UTC), expires=datetime(2021, 1, 1, tzinfo=UTC))
    failed = failure(verify_bundle(old, keydir / "root.json"))
    assert failed.number == 6 and failed.path == "metadata/timestamp.json"
    assert "found expiry 2021-01-01T00:00:00Z" in failed.detail


def test_expiry_is_judged_at_now(bundle: Path, keydir: Path) -> None:
    failed = failure(verify_bundle(bundle, keydir / "root.json", now=CREATED + timedelta(days=4000)))
    assert failed.number == 6 and failed.path == "metadata/root.json"


def test_rollback_to_older_bundle(build: Callable[..., Path], keydir: Path, tmp_path: Path) -> None:
    older = build("old.tar")
    newer = build("new.tar", created=CREATED + timedelta(days=30))
    state = tmp_path / "state"
    report = verify_bundle(newer, keydir / "root.json", state)
    assert report.ok
    commit_trust(report, state)
    failed = failure(verify_bundle(older, keydir / "root.json", state))
    assert failed.number == 7 and failed.path == "metadata/timestamp.json" and "trusted state" in failed.detail
    assert verify_bundle(newer, keydir / "root.json", state).ok  # re-verifying the same bundle is fine


def test_same_version_different_content_is_refused(build: Callable[..., Path], keydir: Path, inputs: object,
                                                   tmp_path: Path) -> None:
    first = build("first.tar")
    state = tmp_path / "state"
    commit_trust(verify_bundle(first, keydir / "root.json", state), state)
    (tmp_path / "inputs" / "policies" / "tenants.yaml").write_text("tenants: {evil: {}}\n")
    fork = build("fork.tar")  # same created time -> same metadata versions
    failed = failure(verify_bundle(fork, keydir / "root.json", state))
    assert failed.number == 7 and failed.path == "metadata/timestamp.json" and "sha256" in failed.detail


def test_mix_and_match_targets_from_another_bundle(build: Callable[..., Path], keydir: Path,
                                                   tmp_path: Path) -> None:
    a = build("a.tar")
    (tmp_path / "inputs" / "policies" / "tenants.yaml").write_text("tenants: {other: {}}\n")
    b = build("b2.tar", created=CREATED + timedelta(days=1))
    b_members = {info.name: data for info, data in read_members(b)}

    def take_targets_from_b(members: Members) -> None:
        for i, (info, _) in enumerate(members):
            if info.name == "metadata/targets.json" or info.name.startswith("targets/"):
                members[i] = (info, b_members[info.name])

    failed = failure(verify_bundle(repack(a, tmp_path / "mixed.tar", take_targets_from_b), keydir / "root.json"))
    assert failed.number == 5 and failed.path == "metadata/targets.json" and "from snapshot.json" in failed.detail

    def take_snapshot_from_b(members: Members) -> None:
        for i, (info, _) in enumerate(members):
            if info.name == "metadata/snapshot.json":
                members[i] = (info, b_members[info.name])

    failed = failure(verify_bundle(repack(a, tmp_path / "mixed2.tar", take_snapshot_from_b), keydir / "root.json"))
    assert failed.number == 4 and failed.path == "metadata/snapshot.json" and "from timestamp.json" in failed.detail


def test_tar_slip_dotdot(bundle: Path, keydir: Path, tmp_path: Path) -> None:
    bad = repack(bundle, tmp_path / "bad.tar", add_member(tarfile.TarInfo("targets/../../etc/cron.d/x"), b"x"))
    failed = failure(verify_bundle(bad, keydir / "root.json"))
    assert failed.number == 1 and failed.path == "targets/../../etc/cron.d/x" and "'..'" in failed.detail


def test_tar_slip_absolute(bundle: Path, keydir: Path, tmp_path: Path) -> None:
    bad = repack(bundle, tmp_path / "bad.tar", add_member(tarfile.TarInfo("/etc/passwd"), b"x"))
    failed = failure(verify_bundle(bad, keydir / "root.json"))
    assert failed.number == 1 and failed.path == "/etc/passwd" and "absolute path" in failed.detail


def _special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def test_symlink_member(bundle: Path, keydir: Path, tmp_path: Path) -> None:
    bad = repack(bundle, tmp_path / "bad.tar", add_member(_special("targets/model/x", tarfile.SYMTYPE, "/etc/shadow")))
    failed = failure(verify_bundle(bad, keydir / "root.json"))
    assert failed.number == 1 and "symbolic link" in failed.detail and failed.path == "targets/model/x"


def test_hardlink_member(bundle: Path, keydir: Path, tmp_path: Path) -> None:
    bad = repack(bundle, tmp_path / "bad.tar", add_member(_special("targets/model/y", tarfile.LNKTYPE, "/etc/shadow")))
    failed = failure(verify_bundle(bad, keydir / "root.json"))
    assert failed.number == 1 and failed.path == "targets/model/y" and "hard link" in failed.detail


@pytest.mark.parametrize(("kind", "word"), [(tarfile.CHRTYPE, "character device"), (tarfile.BLKTYPE, "block device"),
                                           (tarfile.FIFOTYPE, "fifo")])
def test_device_member(kind: bytes, word: str, bundle: Path, keydir: Path, tmp_path: Path) -> None:
    bad = repack(bundle, tmp_path / "bad.tar", add_member(_special("targets/model/dev", kind)))
    failed = failure(verify_bundle(bad, keydir / "root.json"))
    assert failed.number == 1 and failed.path == "targets/model/dev" and word in failed.detail


def test_directory_member(bundle: Path, keydir: Path, tmp_path: Path) -> None:
    bad = repack(bundle, tmp_path / "bad.tar", add_member(_special("targets/model", tarfile.DIRTYPE)))
    failed = failure(verify_bundle(bad, keydir / "root.json"))
    assert failed.number == 1 and failed.path == "targets/model" and "directory" in failed.detail


def test_duplicate_member(bundle: Path, keydir: Path, tmp_path: Path) -> None:
    members = read_members(bundle)
    info, _ = next(m for m in members if m[0].name == MODEL)
    dup = tarfile.TarInfo(MODEL)
    bad = write_members(tmp_path / "bad.tar", [*members, (dup, b"evil")])
    failed = failure(verify_bundle(bad, keydir / "root.json"))
    assert failed.number == 1 and "duplicate" in failed.detail and info.name == failed.path


def test_unknown_metadata_member(bundle: Path, keydir: Path, tmp_path: Path) -> None:
    bad = repack(bundle, tmp_path / "bad.tar", add_member(tarfile.TarInfo("metadata/evil.json"), b"{}"))
    failed = failure(verify_bundle(bad, keydir / "root.json"))
    assert failed.number == 1 and failed.path == "metadata/evil.json" and "unknown member" in failed.detail


def test_compressed_or_garbage_bundle(keydir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"\x1f\x8b" + b"garbage" * 100)
    failed = failure(verify_bundle(bad, keydir / "root.json"))
    assert failed.number == 1 and failed.path == str(bad)


def test_bundle_cut_at_a_member_boundary(bundle: Path, keydir: Path, tmp_path: Path) -> None:
    members = read_members(bundle)
    whole = write_members(tmp_path / "whole.tar", members)
    with tarfile.open(whole, "r:") as tar:
        last = tar.getmembers()[-1]
    bad = tmp_path / "cut.tar"
    bad.write_bytes(whole.read_bytes()[: last.offset])  # ends exactly before the last header
    failed = failure(verify_bundle(bad, keydir / "root.json"))
    assert failed.number == 1 and failed.path == str(bad) and "end-of-archive" in failed.detail


def test_data_hidden_after_end_of_archive(bundle: Path, keydir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bundle.read_bytes() + b"hidden payload")
    failed = failure(verify_bundle(bad, keydir / "root.json"))
    assert failed.number == 1 and failed.path == str(bad) and "trailing data" in failed.detail


def test_target_that_is_also_a_directory(keydir: Path, tmp_path: Path) -> None:
    import hashlib

    from airgap_bundle.report import TargetInfo
    from airgap_bundle.signing import sign_metadata

    files = {"model": b"file", "model/x": b"inner", "manifest.json": b'{"name": "n", "version": "1"}'}
    targets = {p: TargetInfo(len(d), hashlib.sha256(d).hexdigest()) for p, d in files.items()}
    signed = sign_metadata(keydir, targets, expires=CREATED + timedelta(days=3650), version=1)
    members: Members = [(tarfile.TarInfo(f"metadata/{n}"), d) for n, d in sorted(signed.files.items())]
    members += [(tarfile.TarInfo(f"targets/{p}"), d) for p, d in sorted(files.items())]
    failed = failure(verify_bundle(write_members(tmp_path / "bad.tar", members), keydir / "root.json"))
    assert failed.number == 8 and failed.path == "model" and "also a directory" in failed.detail
