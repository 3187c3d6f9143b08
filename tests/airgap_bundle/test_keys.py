from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, Root

from airgap_bundle import KeyManagementError, init_keys, rotate_keys
from airgap_bundle.keys import load_root, load_signers


def test_init_writes_private_keys_0600_and_root_signed_by_threshold(tmp_path: Path) -> None:
    root_path = init_keys(tmp_path / "k", thresholds={"root": 2, "timestamp": 2}, counts={"root": 3, "timestamp": 3})
    assert root_path == tmp_path / "k" / "root.json"
    assert (tmp_path / "k" / "1.root.json").read_bytes() == root_path.read_bytes()
    private = tmp_path / "k" / "private"
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    pems = sorted(private.glob("*.pem"))
    assert len(pems) == 3 + 1 + 1 + 3
    for pem in pems:
        assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    md = Metadata[Root].from_bytes(root_path.read_bytes())
    assert md.signed.roles["root"].threshold == 2 and len(md.signed.roles["root"].keyids) == 3
    assert md.signed.roles["timestamp"].threshold == 2
    md.signed.verify_delegate("root", md.signed_bytes, md.signatures)
    assert b"PRIVATE" not in root_path.read_bytes()


def test_init_refuses_existing_keys(keydir: Path) -> None:
    with pytest.raises(KeyManagementError, match="existing keys"):
        init_keys(keydir)


def test_threshold_above_count_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="threshold"):
        init_keys(tmp_path / "k", thresholds={"targets": 3}, counts={"targets": 2})


def test_group_readable_private_key_is_refused(keydir: Path) -> None:
    pem = next((keydir / "private").glob("targets-*.pem"))
    os.chmod(pem, 0o644)
    with pytest.raises(KeyManagementError, match="0600") as info:
        load_signers(keydir, "targets", load_root(keydir).signed)
    assert "PRIVATE KEY" not in str(info.value)


def test_missing_private_key_under_threshold_is_refused(tmp_path: Path) -> None:
    init_keys(tmp_path / "k", thresholds={"snapshot": 2}, counts={"snapshot": 2})
    next((tmp_path / "k" / "private").glob("snapshot-*.pem")).unlink()
    with pytest.raises(KeyManagementError, match="needs 2 signing key"):
        load_signers(tmp_path / "k", "snapshot", load_root(tmp_path / "k").signed)


def test_rotate_signs_new_root_with_old_and_new_keys(keydir: Path) -> None:
    old = load_root(keydir)
    rotate_keys(keydir, ["root", "timestamp"])
    new = load_root(keydir)
    assert new.signed.version == 2
    assert (keydir / "2.root.json").read_bytes() == (keydir / "root.json").read_bytes()
    old.signed.verify_delegate("root", new.signed_bytes, new.signatures)
    new.signed.verify_delegate("root", new.signed_bytes, new.signatures)
    assert set(old.signed.roles["timestamp"].keyids).isdisjoint(new.signed.roles["timestamp"].keyids)
    assert old.signed.roles["targets"].keyids == new.signed.roles["targets"].keyids
    assert len(list((keydir / "private" / "retired").glob("timestamp-*.pem"))) == 1
