"""C2SP tlog-proof files and consistency proofs: built from the real log, checked offline.

``appliance audit prove`` (a record of a stream or of ``_all``), ``verify-proof`` and
``consistency OLD NEW`` (checkpoint files, sizes, or a saved proof) with their exit codes; every
forgery of a proof file is refused with what was expected.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from appliance.audit import AuditKeys, AuditLog
from appliance.audit.checkpoint import GLOBAL_TREE, sign_checkpoint
from appliance.audit.cli import app
from appliance.audit.cli_proofs import build_proof, consistency_text
from appliance.audit.merkle import MemoryNodes, consistency_proof, record_leaf, root
from appliance.audit.proofs import HEADER, ProofError, TlogProof, verify_proof

from .conftest import fill, log_url, raw_sql

runner = CliRunner()


def test_proof_of_a_stream_record_verifies_and_names_its_record(audit_log: AuditLog) -> None:
    fill(audit_log, "acme", 7)
    text = build_proof(audit_log, tenant="acme", seq=5, gidx=None)
    assert text.startswith(HEADER + "\nextra ") and "\nindex 4\n" in text
    proven = verify_proof(text, audit_log.keys.public_key, tree="acme")
    assert (proven.record.seq, proven.tree, proven.index, proven.checkpoint.size) == (5, "acme", 4, 7)
    assert proven.record.request_id == "acme-5" and proven.pruned_at is None
    # the checkpoint inside is the stored signed note, verbatim
    assert text.split("\n\n", 1)[1] == audit_log.checkpoints("acme")[-1].note


def test_proof_in_the_appliance_wide_tree(audit_log: AuditLog) -> None:
    fill(audit_log, "acme", 2)
    fill(audit_log, "globex", 3)
    text = build_proof(audit_log, tenant=None, seq=None, gidx=3)
    proven = verify_proof(text, audit_log.keys.public_key, tree=GLOBAL_TREE)
    assert (proven.record.stream, proven.record.seq, proven.index) == ("globex", 2, 3)
    with pytest.raises(ProofError, match="tree 'acme'"):
        verify_proof(text, audit_log.keys.public_key, tree="acme")


def test_forged_proofs_are_refused(audit_log: AuditLog, tmp_path: Path) -> None:
    fill(audit_log, "acme", 6)
    text = build_proof(audit_log, tenant="acme", seq=3, gidx=None)
    key = audit_log.keys.public_key
    proof = TlogProof.parse(text)
    record = json.loads(proof.extra or b"")

    def forged(**changes: object) -> str:
        return TlogProof(**{"index": proof.index, "path": proof.path, "note": proof.note, "extra": proof.extra,
                            **changes}).text()  # type: ignore[arg-type]

    with pytest.raises(ProofError, match="record hash"):
        verify_proof(forged(extra=json.dumps({**record, "actor": "key:other"}).encode()), key)
    with pytest.raises(ProofError, match="leaf 2 of tree 'acme'"):
        verify_proof(forged(index=3), key)
    with pytest.raises(ProofError, match="does not lead there"):
        verify_proof(forged(path=(b"\x00" * 32, *proof.path[1:])), key)
    with pytest.raises(ProofError, match="does not lead there"):
        verify_proof(forged(path=proof.path[:-1]), key)
    with pytest.raises(ProofError, match="signed by the audit key"):
        verify_proof(forged(note=proof.note.replace("\n6\n", "\n7\n", 1)), key)
    with pytest.raises(ProofError, match="origin"):
        verify_proof(text, AuditKeys(tmp_path / "other.key").public_key)
    with pytest.raises(ProofError, match="'extra' line"):
        verify_proof(forged(extra=None), key)
    with pytest.raises(ProofError, match="first line"):
        verify_proof("c2sp.org/tlog-proof@v2\n" + text.split("\n", 1)[1], key)
    with pytest.raises(ProofError, match="empty line"):
        verify_proof(text.split("\n\n")[0], key)


def test_pruned_record_is_proven_by_its_hash(audit_log: AuditLog) -> None:
    fill(audit_log, "acme", 3)
    raw_sql(audit_log, "UPDATE audit_events SET data = '{}', pruned_at = '2026-01-01T00:00:00.000000Z' "
            "WHERE stream = 'acme' AND seq = 2")
    proven = verify_proof(build_proof(audit_log, tenant="acme", seq=2, gidx=None), audit_log.keys.public_key)
    assert proven.pruned_at == "2026-01-01T00:00:00.000000Z" and proven.record.data == {}


def test_prove_and_verify_proof_commands(audit_log: AuditLog, key_path: Path, tmp_path: Path) -> None:
    fill(audit_log, "acme", 4)
    db = log_url(audit_log)
    pem = tmp_path / "audit.pem"
    pem.write_bytes(audit_log.public_key_pem())
    out = tmp_path / "r2.tlog-proof"
    result = runner.invoke(app, ["prove", "--db", db, "--key", str(key_path), "--tenant", "acme", "--seq", "2",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["verify-proof", str(out), "--public-key", str(pem), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["seq"] == 2
    out.write_text(out.read_text().replace("index 1", "index 2"))
    result = runner.invoke(app, ["verify-proof", str(out), "--public-key", str(pem)])
    assert result.exit_code == 1 and "NOT VERIFIED" in result.output
    result = runner.invoke(app, ["prove", "--db", db, "--key", str(key_path), "--tenant", "acme", "--seq", "9"])
    assert result.exit_code == 2 and "found none" in result.output
    result = runner.invoke(app, ["prove", "--db", db, "--key", str(key_path), "--tenant", "acme", "--gidx", "1"])
    assert result.exit_code == 2 and "neither or both" in result.output
    result = runner.invoke(app, ["prove", "--db", db, "--key", str(key_path), "--gidx", "3"])
    assert result.exit_code == 0 and result.output.startswith(HEADER)


def test_consistency_between_checkpoint_files_sizes_and_a_saved_proof(audit_log: AuditLog, key_path: Path,
                                                                       tmp_path: Path) -> None:
    fill(audit_log, "acme", 3)
    old_cp = audit_log.checkpoint("acme")[0]
    fill(audit_log, "acme", 6)
    new_cp = audit_log.checkpoint("acme")[0]
    assert (old_cp.size, new_cp.size) == (3, 9)
    old, new = tmp_path / "old.note", tmp_path / "new.note"
    old.write_text(old_cp.note)
    new.write_text(new_cp.note)
    db = log_url(audit_log)
    pem = tmp_path / "audit.pem"
    pem.write_bytes(audit_log.public_key_pem())
    saved = tmp_path / "3-9.proof"
    result = runner.invoke(app, ["consistency", str(old), str(new), "--db", db, "--public-key", str(pem),
                                 "--out", str(saved)])
    assert result.exit_code == 0, result.output
    assert "CONSISTENT" in result.output and saved.read_text().startswith("sovereign-audit/consistency-proof@v1")
    # offline: no database, the two notes and the saved proof
    result = runner.invoke(app, ["consistency", str(old), str(new), "--proof", str(saved), "--public-key", str(pem),
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["ok"] is True
    # sizes: the stored signed checkpoints
    result = runner.invoke(app, ["consistency", "3", "9", "--db", db, "--key", str(key_path), "--tree", "acme",
                                 "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["old"]["signed"] is True
    # a doctored proof hash, or proof for other sizes: not consistent / refused
    lines = saved.read_text().splitlines()
    lines[-1] = base64.b64encode(b"\x01" * 32).decode()
    saved.write_text("\n".join(lines) + "\n")
    result = runner.invoke(app, ["consistency", str(old), str(new), "--proof", str(saved), "--public-key", str(pem)])
    assert result.exit_code == 1 and "NOT CONSISTENT" in result.output
    # a checkpoint of another tree
    fill(audit_log, "globex", 2)
    other = tmp_path / "globex.note"
    other.write_text(audit_log.checkpoint("globex")[0].note)
    result = runner.invoke(app, ["consistency", str(other), str(new), "--db", db, "--public-key", str(pem)])
    assert result.exit_code == 1 and "two checkpoints of tree" in result.output
    # usage errors
    assert runner.invoke(app, ["consistency", str(old), str(new), "--public-key", str(pem)]).exit_code == 2
    assert runner.invoke(app, ["consistency", "3", "9", "--public-key", str(pem)]).exit_code == 2
    assert runner.invoke(app, ["consistency", str(old), str(new), "--db", db]).exit_code == 2


def test_a_forged_newer_checkpoint_is_not_consistent(audit_log: AuditLog, key_path: Path, tmp_path: Path) -> None:
    """A key holder who rewrites history signs a tree that the older checkpoint does not extend."""
    fill(audit_log, "acme", 4)
    old_cp = audit_log.checkpoint("acme")[0]
    records = audit_log.query("acme")
    leaves = [record_leaf(r.hash) for r in records]
    leaves[1] = record_leaf("ab" * 32)  # history rewritten at seq 2, then grown to 6
    leaves += [record_leaf("cd" * 32), record_leaf("ef" * 32)]
    forged = sign_checkpoint(audit_log.keys, tree="acme", size=6, root=root(MemoryNodes(leaves), 6), ts=old_cp.ts)
    old, new = tmp_path / "old.note", tmp_path / "new.note"
    old.write_text(old_cp.note)
    new.write_text(forged.note)
    saved = tmp_path / "forged.proof"
    saved.write_text(consistency_text("acme", 4, 6, consistency_proof(MemoryNodes(leaves), 4, 6)))
    pem = tmp_path / "audit.pem"
    pem.write_bytes(audit_log.public_key_pem())
    result = runner.invoke(app, ["consistency", str(old), str(new), "--proof", str(saved), "--public-key", str(pem)])
    assert result.exit_code == 1 and "NOT CONSISTENT" in result.output
