"""Publication of checkpoints off the box: every note written atomically, never a split view,
never blocking the log, bounded while the directory is unusable; and the ``audit:`` settings."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.audit import AuditLog
from appliance.audit.anchoring import Anchoring
from appliance.audit.checkpoint import GLOBAL_TREE
from appliance.audit.note import SIG_COSIGNATURE, NoteSigner, SignedNote
from appliance.audit.publish import CheckpointPublisher, SplitViewError, write_checkpoint
from appliance.config import AuditAnchorSettings, load_config
from appliance.errors import ConfigError
from tests.appliance.audit.anchor_helpers import fill


def _log(tmp_path: Path, **kwargs: object) -> AuditLog:
    return AuditLog(f"sqlite:///{tmp_path / 'audit.db'}", tmp_path / "secrets" / "audit.key", **kwargs)  # type: ignore[arg-type]


def test_every_checkpoint_is_published_as_signed_and_latest_is_the_newest(tmp_path: Path) -> None:
    (tmp_path / "pub").mkdir()
    publisher = CheckpointPublisher(tmp_path / "pub")
    log = _log(tmp_path, checkpoint_every=4, on_checkpoints=publisher)
    fill(log, 10, stream="acme")
    fill(log, 3, stream="beta")
    log.close()
    assert publisher.flush(30)
    for tree in (GLOBAL_TREE, "acme", "beta"):
        stored = _log(tmp_path).checkpoints(tree)
        assert stored, tree
        for cp in stored:
            assert (tmp_path / "pub" / tree / f"{cp.size}.checkpoint").read_text() == cp.note
        assert (tmp_path / "pub" / tree / "latest").read_text() == stored[-1].note
    assert not [p for p in (tmp_path / "pub").rglob(".*")]  # no temp file left behind
    publisher.stop()


def test_a_different_checkpoint_for_a_published_size_is_a_split_view_and_never_replaces_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = _log(tmp_path / "a", checkpoint_every=None)
    fill(first, 3)
    real = first.checkpoint()[0]
    first.close()
    other = _log(tmp_path / "b", checkpoint_every=None)  # another tree of the same size
    fill(other, 3, tag="other")
    forged = other.checkpoint()[0]
    other.close()
    (tmp_path / "pub").mkdir()
    write_checkpoint(tmp_path / "pub", real.tree, real.note)
    path = tmp_path / "pub" / real.tree / f"{real.size}.checkpoint"
    with pytest.raises(SplitViewError, match="split view"):
        write_checkpoint(tmp_path / "pub", real.tree, forged.note)
    assert path.read_text() == real.note
    publisher = CheckpointPublisher(tmp_path / "pub")
    with caplog.at_level(logging.CRITICAL, logger="appliance.audit.publish"):
        publisher([forged])
        assert publisher.flush(30)
    assert publisher.split_views == 1 and path.read_text() == real.note
    assert any("split view" in r.getMessage() for r in caplog.records)
    publisher.stop()


def test_a_cosignature_is_merged_into_the_published_note_and_latest_never_moves_back(tmp_path: Path) -> None:
    log = _log(tmp_path, checkpoint_every=None)
    fill(log, 2)
    small = log.checkpoint()[0]
    fill(log, 2)
    big = next(cp for cp in log.checkpoint() if cp.tree == small.tree)
    log.close()
    witness = NoteSigner("w1", Ed25519PrivateKey.generate(), SIG_COSIGNATURE)
    note = SignedNote.parse(big.note)
    cosigned = note.with_signature(witness.cosign(note.body, 1_700_000_000)).text()
    pub = tmp_path / "pub"
    pub.mkdir()
    assert write_checkpoint(pub, big.tree, big.note)
    assert write_checkpoint(pub, big.tree, cosigned)
    assert not write_checkpoint(pub, big.tree, big.note)  # adds nothing: the file keeps both lines
    text = (pub / big.tree / f"{big.size}.checkpoint").read_text()
    assert SignedNote.parse(text).signed_by(witness.verifier) and text == cosigned
    write_checkpoint(pub, small.tree, small.note)  # an older checkpoint arriving late
    assert (pub / small.tree / "latest").read_text() == cosigned


def test_missing_directory_never_blocks_the_log_is_never_created_stays_bounded_and_recovers(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    media = tmp_path / "media" / "audit"  # the removable medium is not mounted
    publisher = CheckpointPublisher(media, max_pending=4, retry_s=0.05)
    log = _log(tmp_path, checkpoint_every=1, on_checkpoints=publisher)
    with caplog.at_level(logging.ERROR, logger="appliance.audit.publish"):
        for i in range(12):
            fill(log, 1, stream=("acme", "beta")[i % 2], tag=str(i))  # every append commits and is signed
        assert publisher.errors >= 2
        assert publisher.pending <= 4 + 3  # collapsed to the newest per tree (3 trees) plus a batch
    assert not (tmp_path / "media").exists()  # nothing written to the mount point's disk
    messages = [r for r in caplog.records if "cannot be published" in r.getMessage()]
    assert len(messages) == 1  # once a minute, not once per attempt
    media.mkdir(parents=True)  # mounted
    fill(log, 1, stream="acme", tag="after")  # the next checkpoint wakes the publisher
    assert publisher.flush(30)
    newest = log.checkpoints(GLOBAL_TREE)[-1]
    log.close()
    publisher.stop()
    assert (media / GLOBAL_TREE / "latest").read_text() == newest.note
    assert (media / "acme" / "latest").read_text() == _log(tmp_path).checkpoints("acme")[-1].note


def test_audit_settings_from_appliance_yaml(tmp_path: Path) -> None:
    def load(audit: str) -> AuditAnchorSettings:
        (tmp_path / "current").mkdir(exist_ok=True)
        (tmp_path / "current" / "appliance.yaml").write_text(textwrap.dedent("""\
            version: "1.0"
            model: {name: m, path: /models/m}
            policies_dir: /policies
            """) + audit)
        return load_config(tmp_path).audit_anchors

    assert load("") == AuditAnchorSettings()
    settings = load(textwrap.dedent("""\
        audit:
          min_free_bytes: 0
          publish_dir: /media/audit
          witness_url: http://127.0.0.1:7380
          witness_key: w+01020304+BAAA
          witness_interval_s: 2
        """))
    assert settings.publish_dir == Path("/media/audit") and settings.witness_interval_s == 2.0
    for bad, fragment in [("audit: {witness_url: 'http://x:1'}", "go together"),
                          ("audit: {publish_dir: relative/dir}", "absolute path"),
                          ("audit: {witness_interval_s: 0}", "(0, 86400]"),
                          ("audit: {witness_url: 'ftp://x', witness_key: k}", "http://host:port"),
                          ("audit: {witness_streams: 'yes'}", "true or false"),
                          ("audit: {publish_to: /x}", "audit must be a mapping of")]:
        with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace("]", r"\]")):
            load(bad + "\n")
    with pytest.raises(ValueError, match="witness key"):
        Anchoring.from_config(settings)  # the key text above is not a real verifier key
    anchoring = Anchoring.from_config(AuditAnchorSettings(publish_dir=tmp_path / "pub"))
    assert anchoring.enabled and anchoring.witness is None


def test_anchoring_publishes_at_start_what_was_signed_before_it_hooked_in(tmp_path: Path) -> None:
    before = _log(tmp_path, checkpoint_every=None)  # the CLI, or the previous run without publication
    fill(before, 3, stream="acme")
    fill(before, 2, stream="beta")
    signed = before.checkpoint()
    before.close()
    (tmp_path / "pub").mkdir()
    anchoring = Anchoring(publish_dir=tmp_path / "pub")
    log = _log(tmp_path, on_checkpoints=anchoring.on_checkpoints)
    anchoring.start(log)
    anchoring.stop(30)
    log.close()
    assert {cp.tree: cp.note for cp in signed} == {
        tree: (tmp_path / "pub" / tree / "latest").read_text() for tree in (GLOBAL_TREE, "acme", "beta")}
