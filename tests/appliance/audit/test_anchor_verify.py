"""Verification against anchors: what the signing key alone cannot hide once a checkpoint left the box.

Every attack here re-signs its result with the appliance's real key, so plain verification
passes; the anchors (a publish directory written by the running log, or cosignatures) catch it.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.audit import AuditKeys, AuditLog
from appliance.audit.anchor_verify import AnchorInputError, AnchorReport, verify_anchors
from appliance.audit.checkpoint import GLOBAL_TREE, sign_checkpoint
from appliance.audit.note import SIG_COSIGNATURE, NoteSigner, SignedNote
from appliance.audit.publish import CheckpointPublisher
from tests.appliance.audit.anchor_helpers import cut_to, fill, run_cli


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'audit.db'}"


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    return tmp_path / "secrets" / "audit-signing.key"


def _published_log(tmp_path: Path, url: str, key_path: Path, n: int) -> Path:
    """A log of ``n`` records in one stream whose every checkpoint was published while it ran."""
    pub = tmp_path / "pub"
    pub.mkdir()
    publisher = CheckpointPublisher(pub)
    log = AuditLog(url, key_path, checkpoint_every=4, on_checkpoints=publisher)
    fill(log, n)
    log.close()
    assert publisher.flush(30)
    publisher.stop()
    return pub


def _check(url: str, key_path: Path, anchors: list[Path], **kwargs: object) -> AnchorReport:
    engine = sa.create_engine(url)
    try:
        return verify_anchors(engine, AuditKeys(key_path, create=False).public_key, anchors, **kwargs)  # type: ignore[arg-type]
    finally:
        engine.dispose()


def _resign(url: str, key_path: Path) -> AuditLog:
    log = AuditLog(url, key_path, checkpoint_every=None)
    log.checkpoint()
    return log


def test_a_consistent_looking_shorter_log_passes_verify_and_fails_against_the_published_anchors(
        tmp_path: Path, url: str, key_path: Path) -> None:
    pub = _published_log(tmp_path, url, key_path, 13)
    assert run_cli("verify-anchors", "--db", url, "--key", str(key_path), "--anchor", str(pub)).returncode == 0
    recorded = AuditLog(url, key_path, create=False).query("_admin")
    assert [(r.event_type, r.data["what"], r.data["result"]) for r in recorded] == [
        ("admin.audit_verified", "anchors", "ok")]  # the verification is itself in the log
    cut_to(url, 9)  # the newest records, their nodes and checkpoints gone; the head re-signed
    log = _resign(url, key_path)
    try:
        assert log.verify().ok
    finally:
        log.close()
    done = run_cli("verify-anchors", "--db", url, "--key", str(key_path), "--anchor", str(pub), "--json")
    assert done.returncode == 1, done.stderr
    result = json.loads(done.stdout)
    assert result["database"]["ok"] is True and result["anchors"]["ok"] is False
    failure = result["anchors"]["failures"][0]
    assert failure["check"] == "3 anchored root" and failure["size"] == 12
    assert failure["found"] == "9 records in the database: records deleted"


def test_history_rewritten_to_the_same_size_fails_at_the_first_anchor_it_contradicts(
        tmp_path: Path, url: str, key_path: Path) -> None:
    pub = _published_log(tmp_path, url, key_path, 12)
    cut_to(url, 5)
    log = AuditLog(url, key_path, checkpoint_every=None)
    try:
        fill(log, 7, tag="rewritten")
        log.checkpoint()
        assert log.verify().ok
    finally:
        log.close()
    report = _check(url, key_path, [pub])
    bad = [(f.check, f.tree, f.size) for f in report.failures]
    # Sizes 8 and 12 were published for both trees; 4 holds only untouched records.
    assert bad == [("3 anchored root", GLOBAL_TREE, 8), ("3 anchored root", GLOBAL_TREE, 12),
                   ("3 anchored root", "acme", 8), ("3 anchored root", "acme", 12)]
    assert "recomputed from the records" in report.failures[0].found


def test_altered_tree_nodes_fail_the_consistency_proof(tmp_path: Path, url: str, key_path: Path) -> None:
    pub = _published_log(tmp_path, url, key_path, 5)
    log = AuditLog(url, key_path, checkpoint_every=None)
    fill(log, 8, tag="later")
    log.close()
    assert _check(url, key_path, [pub]).ok
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE audit_tree_nodes SET hash = zeroblob(32) WHERE tree = :t"), {"t": GLOBAL_TREE})
    engine.dispose()
    report = _check(url, key_path, [pub])
    assert [(f.check, f.tree) for f in report.failures] == [("4 consistency proof", GLOBAL_TREE)]


def test_planted_foreign_and_corrupt_anchor_files(tmp_path: Path, url: str, key_path: Path) -> None:
    pub = _published_log(tmp_path, url, key_path, 4)
    impostor = AuditKeys(tmp_path / "impostor" / "key")
    real = SignedNote.parse((pub / GLOBAL_TREE / "latest").read_text())
    other = tmp_path / "other"
    other.mkdir()
    foreign = sign_checkpoint(impostor, tree=GLOBAL_TREE, size=4, root=real.checkpoint().root, ts="t")
    (other / "foreign.checkpoint").write_text(foreign.note)  # another appliance's log: skipped
    report = _check(url, key_path, [pub, other])
    assert report.ok and len(report.skipped) == 1
    # Our origin, the impostor's signature (the line claims our key name): a planted anchor.
    sig = base64.b64encode(real.signatures[0].key_id + base64.b64decode(impostor.sign(real.body.encode())))
    (other / "planted.checkpoint").write_text(f"{real.body}\n\u2014 {real.signatures[0].name} {sig.decode()}\n")
    (other / "torn.checkpoint").write_text(real.text()[:20])
    checks = sorted(f.check for f in _check(url, key_path, [pub, other]).failures)
    assert checks == ["1 anchor parses", "2 anchor signature"]


def test_inputs_that_cannot_be_used_are_errors_not_passes(tmp_path: Path, url: str, key_path: Path) -> None:
    _published_log(tmp_path, url, key_path, 2)
    missing = run_cli("verify-anchors", "--db", url, "--key", str(key_path), "--anchor", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "expected a directory of checkpoints" in missing.stderr
    with pytest.raises(AnchorInputError, match="neither"):
        _check(url, key_path, [])
    with pytest.raises(AnchorInputError, match="at least one witness key"):
        _check(url, key_path, [tmp_path / "pub"], require_witness=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    report = _check(url, key_path, [empty])
    assert not report.ok and report.failures[0].expected.startswith("at least one checkpoint of")


def test_stored_cosignatures_count_as_anchors_and_a_forged_one_fails(
        tmp_path: Path, url: str, key_path: Path) -> None:
    _published_log(tmp_path, url, key_path, 6)
    witness = NoteSigner("lan-witness", Ed25519PrivateKey.generate(), SIG_COSIGNATURE)
    log = AuditLog(url, key_path, checkpoint_every=None)
    cp = log.checkpoints(GLOBAL_TREE)[-1]
    log.close()
    line = witness.cosign(SignedNote.parse(cp.note).body, 1_800_000_000).line().rstrip("\n")
    engine = sa.create_engine(url)
    insert = sa.text("INSERT INTO audit_cosignatures (tree, size, root, witness, line, ts) "
                     "VALUES (:tree, :size, :root, :w, :line, 't')")
    with engine.begin() as conn:
        conn.execute(insert, {"tree": GLOBAL_TREE, "size": cp.size, "root": cp.root, "w": witness.name, "line": line})
    report = _check(url, key_path, [], witness_keys=[witness.verifier.text()], require_witness=True)
    assert report.ok and report.witnesses[0].newest_size == cp.size
    assert report.witnesses[0].cosigned_at == 1_800_000_000 and report.witnesses[0].records_after == 0
    forged = line[:-8] + ("A" if line[-8] != "A" else "B") + line[-7:]
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM audit_cosignatures"))
        conn.execute(insert, {"tree": GLOBAL_TREE, "size": cp.size, "root": cp.root, "w": witness.name,
                              "line": forged})
    engine.dispose()
    report = _check(url, key_path, [], witness_keys=[witness.verifier.text()], require_witness=True)
    assert sorted(f.check for f in report.failures) == ["5 witness cosignature", "5 witness cosignature"]
