"""Export a tenant's records and verify them offline; every tamper case fails a named check.

Version 2 exports also carry the stream's signed checkpoint, the range proof (tree edge plus a
consistency proof) and C2SP tlog-proof files: each of those, tampered with, fails its own check.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.audit import AuditError, AuditIntegrityError, AuditKeys, AuditLog, export_stream, verify_export
from appliance.audit.canonical import canonical_json
from appliance.audit.checkpoint import sign_checkpoint
from appliance.audit.proofs import verify_proof
from appliance.audit.record import compute_record_hash

from .conftest import fill, raw_sql

FIRST_PROOF, LAST_PROOF = f"proofs/{1:020d}.tlog-proof", f"proofs/{6:020d}.tlog-proof"


@pytest.fixture
def exported(audit_log: AuditLog, tmp_path: Path) -> tuple[Path, Path]:
    """An export of tenant acme (6 records) and the public key, copied where no database is."""
    fill(audit_log, "acme", 3)
    fill(audit_log, "globex", 4)
    audit_log.append("admin.key_created", stream="_admin", actor="admin", tenant="acme", data={"key_id": "k1"})
    fill(audit_log, "acme", 3)
    tar = export_stream(audit_log, "acme", None, None, tmp_path / "exports" / "acme.tar")
    offline = tmp_path / "officer"
    offline.mkdir()
    (offline / "audit.pem").write_bytes(audit_log.public_key_pem())
    return Path(shutil.copy(tar, offline / "acme.tar")), offline / "audit.pem"


def _read(tar: Path) -> dict[str, bytes]:
    """Every member, in tar order (dicts keep it, and _write writes it back the same way)."""
    with tarfile.open(tar) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers()}  # type: ignore[union-attr]


def _write(tar: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(tar, "w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def _edit_records(tar: Path, edit: Callable[[list[dict[str, object]]], list[dict[str, object]]]) -> None:
    members = _read(tar)
    records = [json.loads(line) for line in members["records.jsonl"].splitlines()]
    records = edit(records)
    members["records.jsonl"] = b"".join(
        json.dumps(r, sort_keys=True, separators=(",", ":")).encode() + b"\n" for r in records)
    _write(tar, members)


def _failed(tar: Path, pem: Path) -> dict[str, object]:
    report = verify_export(tar, pem)
    assert not report.ok and report.first_failure is not None
    with pytest.raises(AuditIntegrityError):
        report.raise_for_failure()
    return {c.name: c for c in report.checks if not c.passed}


def test_round_trip_verifies_offline(exported: tuple[Path, Path]) -> None:
    tar, pem = exported
    report = verify_export(tar, pem)
    assert report.ok, report.to_dict()
    assert [c.number for c in report.checks] == list(range(1, 15))
    assert (report.stream, report.count, report.first_seq, report.last_seq) == ("acme", 6, 1, 6)
    members = _read(tar)
    assert list(members) == ["records.jsonl", "checkpoint", FIRST_PROOF, LAST_PROOF, "manifest.json", "manifest.sig"]
    manifest = json.loads(members["manifest.json"])
    assert manifest["checkpoint"]["size"] == 6 and manifest["anchor_prev_hash"] is not None
    assert manifest["checkpoint"]["note"] == members["checkpoint"].decode()
    assert manifest["tree_edge"] == [] and manifest["consistency_proof"] == []  # the whole tree, at its head
    assert manifest["proofs"] == {"mode": "ends", "count": 2}
    assert {c.name for c in report.checks} >= {"checkpoint note", "range proof", "proof files", "format file"}


def test_export_holds_only_the_tenants_own_records(exported: tuple[Path, Path]) -> None:
    records = [json.loads(line) for line in _read(exported[0])["records.jsonl"].splitlines()]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert {r["stream"] for r in records} == {"acme"} and {r["tenant"] for r in records} == {"acme"}
    blob = b"".join(_read(exported[0]).values())
    assert b"globex" not in blob and b"_admin" not in blob and b"admin.key_created" not in blob


def test_an_extracted_directory_verifies_too(exported: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "extracted"
    with tarfile.open(exported[0]) as t:
        t.extractall(out, filter="data")
    assert verify_export(out, exported[1]).ok


def test_edited_record(exported: tuple[Path, Path]) -> None:
    def edit(records: list[dict[str, object]]) -> list[dict[str, object]]:
        records[2]["data"] = {"model": "other"}
        return records
    _edit_records(exported[0], edit)
    failed = _failed(*exported)
    # the leaves are the stored hashes, so the range proof and the end proofs still hold
    assert set(failed) == {"records digest", "record chain"}
    assert failed["record chain"].seq == 3 and failed["record chain"].detail.startswith("seq 3: hash")  # type: ignore[attr-defined]


def test_edited_record_with_rehashed_chain_still_fails_the_digest(exported: tuple[Path, Path]) -> None:
    def edit(records: list[dict[str, object]]) -> list[dict[str, object]]:
        prev = records[0]["prev_hash"]
        for r in records:
            if r["seq"] == 2:
                r["data"] = {"forged": True}
            r["prev_hash"] = prev
            r["hash"] = prev = compute_record_hash({k: v for k, v in r.items() if k != "hash"})
        return records
    _edit_records(exported[0], edit)
    failed = _failed(*exported)
    assert "records digest" in failed and "record chain" not in failed
    # new hashes are new leaves: the signed tree no longer holds them
    assert {"range and anchor", "range proof", "proof files"} <= set(failed)


def test_deleted_record(exported: tuple[Path, Path]) -> None:
    _edit_records(exported[0], lambda rs: rs[:3] + rs[4:])
    failed = _failed(*exported)
    assert {"records digest", "record count", "record chain", "range proof"} <= set(failed)
    chain = failed["record chain"]
    assert (chain.seq, chain.expected, chain.found) == (4, "seq 4", "seq 5")  # type: ignore[attr-defined]


def test_reordered_records(exported: tuple[Path, Path]) -> None:
    _edit_records(exported[0], lambda rs: [rs[0], rs[2], rs[1], *rs[3:]])
    failed = _failed(*exported)
    assert failed["record chain"].seq == 2  # type: ignore[attr-defined]
    assert "record count" not in failed


def test_inserted_record(exported: tuple[Path, Path]) -> None:
    def edit(records: list[dict[str, object]]) -> list[dict[str, object]]:
        forged = {**records[1], "request_id": "forged"}
        return [*records[:2], forged, *records[2:]]
    _edit_records(exported[0], edit)
    failed = _failed(*exported)
    assert {"records digest", "record count", "record chain"} <= set(failed)
    assert failed["record chain"].seq == 3  # type: ignore[attr-defined]


def test_truncated_tail(exported: tuple[Path, Path]) -> None:
    _edit_records(exported[0], lambda rs: rs[:4])
    failed = _failed(*exported)
    assert {"records digest", "record count", "range and anchor", "range proof", "proof files"} <= set(failed)
    assert "record chain" not in failed


def test_wrong_key(exported: tuple[Path, Path], tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.pem"
    wrong.write_bytes(AuditKeys(tmp_path / "wrong.key").public_key_pem())
    report = verify_export(exported[0], wrong)
    assert not report.ok
    first = report.first_failure
    assert first is not None and (first.number, first.name) == (3, "manifest signature")
    assert {c.name for c in report.checks if not c.passed} >= {"manifest signature", "manifest schema"}


def test_manifest_edited(exported: tuple[Path, Path]) -> None:
    members = _read(exported[0])
    manifest = json.loads(members["manifest.json"])
    manifest["count"] = 5
    members["manifest.json"] = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    _write(exported[0], members)
    failed = _failed(*exported)
    assert "manifest signature" in failed
    assert verify_export(*exported).first_failure.number == 3  # type: ignore[union-attr]


def test_extra_or_missing_member_is_refused(exported: tuple[Path, Path]) -> None:
    members = _read(exported[0])
    _write(exported[0], {**members, "extra.txt": b"x"})
    assert _failed(*exported).keys() >= {"export readable"}
    _write(exported[0], {k: v for k, v in members.items() if k != "manifest.sig"})
    report = verify_export(*exported)
    assert report.first_failure is not None and report.first_failure.number == 1
    assert "missing" in report.first_failure.detail
    _write(exported[0], {("proofs/7.tlog-proof" if k == LAST_PROOF else k): v for k, v in members.items()})
    assert "proofs/7.tlog-proof" in verify_export(*exported).first_failure.detail  # type: ignore[union-attr]


def test_garbage_file_and_bad_key_file_are_reported_not_raised(exported: tuple[Path, Path], tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar")
    assert verify_export(junk, exported[1]).first_failure.name == "export readable"  # type: ignore[union-attr]
    bad_pem = tmp_path / "bad.pem"
    bad_pem.write_text("nope")
    assert verify_export(exported[0], bad_pem).first_failure.name == "public key"  # type: ignore[union-attr]


def test_period_selects_a_contiguous_slice(audit_log: AuditLog, tmp_path: Path) -> None:
    fill(audit_log, "acme", 5)
    records = audit_log.query("acme")
    tar = export_stream(audit_log, "acme", records[1].ts, records[4].ts, tmp_path / "slice.tar")
    pem = tmp_path / "audit.pem"
    pem.write_bytes(audit_log.public_key_pem())
    report = verify_export(tar, pem)
    assert report.ok, report.to_dict()
    expected = [r.seq for r in records if records[1].ts <= r.ts < records[4].ts]
    assert (report.first_seq, report.last_seq) == (expected[0], expected[-1])
    manifest = json.loads(_read(tar)["manifest.json"])
    assert manifest["anchor_prev_hash"] == records[expected[0] - 2].hash
    assert manifest["tree_edge"] and manifest["consistency_proof"]  # a slice is proven inside the bigger tree


def test_empty_period_exports_and_verifies(audit_log: AuditLog, tmp_path: Path) -> None:
    fill(audit_log, "acme", 2)
    tar = export_stream(audit_log, "acme", "2001-01-01T00:00:00Z", "2001-01-02T00:00:00Z", tmp_path / "e.tar")
    pem = tmp_path / "audit.pem"
    pem.write_bytes(audit_log.public_key_pem())
    report = verify_export(tar, pem)
    assert report.ok and report.count == 0
    assert not [name for name in _read(tar) if name.startswith("proofs/")]


def test_export_refuses_a_broken_chain_and_existing_files(audit_log: AuditLog, tmp_path: Path) -> None:
    fill(audit_log, "acme", 3)
    export_stream(audit_log, "acme", None, None, tmp_path / "a.tar")
    with pytest.raises(AuditError, match="existing"):
        export_stream(audit_log, "acme", None, None, tmp_path / "a.tar")
    raw_sql(audit_log, "UPDATE audit_events SET actor = 'x' WHERE seq = 2")
    with pytest.raises(AuditIntegrityError) as info:
        export_stream(audit_log, "acme", None, None, tmp_path / "b.tar")
    assert info.value.seq == 2 and not (tmp_path / "b.tar").exists()


def test_edited_checkpoint_note(exported: tuple[Path, Path]) -> None:
    members = _read(exported[0])
    note = members["checkpoint"].decode()
    lines = note.split("\n")
    lines[1] = "7"  # claim a bigger tree
    members["checkpoint"] = "\n".join(lines).encode()
    _write(exported[0], members)
    failed = _failed(*exported)
    assert set(failed) == {"checkpoint note", "range proof", "proof files"}
    assert "another text" in failed["checkpoint note"].detail  # type: ignore[attr-defined]


def test_checkpoint_of_another_key_is_refused(audit_log: AuditLog, tmp_path: Path, key_path: Path) -> None:
    """A manifest re-signed by the key that also signed a forged checkpoint still names the wrong origin."""
    fill(audit_log, "acme", 2)
    tar = export_stream(audit_log, "acme", None, None, tmp_path / "a.tar")
    other = AuditKeys(tmp_path / "other.key")
    members = _read(tar)
    manifest = json.loads(members["manifest.json"])
    forged = sign_checkpoint(other, tree="acme", size=2, root=bytes.fromhex(manifest["checkpoint"]["root"]),
                             ts=manifest["checkpoint"]["ts"])
    manifest["checkpoint"] = forged.to_dict()
    manifest["key_id"] = other.key_id
    members["checkpoint"] = forged.note.encode()
    members["manifest.json"] = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    members["manifest.sig"] = other.sign(members["manifest.json"]).encode()
    _write(tar, members)
    pem = tmp_path / "audit.pem"
    pem.write_bytes(audit_log.public_key_pem())
    failed = _failed(tar, pem)
    assert {"manifest signature", "manifest schema", "checkpoint note"} <= set(failed)


def test_tampered_or_missing_proof_file(exported: tuple[Path, Path]) -> None:
    members = _read(exported[0])
    text = members[LAST_PROOF].decode().split("\n")
    index_line = next(i for i, line in enumerate(text) if line.startswith("index "))
    text[index_line + 1] = base64.b64encode(b"\x00" * 32).decode()  # one sibling hash replaced
    _write(exported[0], {**members, LAST_PROOF: "\n".join(text).encode()})
    failed = _failed(*exported)
    assert set(failed) == {"proof files"} and failed["proof files"].seq == 6  # type: ignore[attr-defined]
    _write(exported[0], {k: v for k, v in members.items() if k != FIRST_PROOF})
    failed = _failed(*exported)
    assert set(failed) == {"proof files"} and "found 1" in failed["proof files"].detail  # type: ignore[attr-defined]


def test_pruned_records_export_and_verify(audit_log: AuditLog, tmp_path: Path) -> None:
    fill(audit_log, "acme", 5)
    pruned_at = "2026-01-02T03:04:05.000006Z"
    assert raw_sql(audit_log, "UPDATE audit_events SET data = '{}', pruned_at = ? WHERE stream = 'acme' "
                   "AND seq IN (2, 3)", (pruned_at,)) == 2
    assert not audit_log.verify("acme").ok  # a prune no signed retention record accounts for
    audit_log.append("admin.audit_prune_started", stream="_admin", actor="test", tenant="acme",
                     data={"first_seq": 2, "last_seq": 3, "pruned_at": pruned_at})  # as retention accounts for it
    assert audit_log.verify("acme").ok
    tar = export_stream(audit_log, "acme", None, None, tmp_path / "p.tar", proofs="all")
    pem = tmp_path / "audit.pem"
    pem.write_bytes(audit_log.public_key_pem())
    report = verify_export(tar, pem)
    assert report.ok, report.to_dict()
    assert report.extra["pruned"] == 2
    records = [json.loads(line) for line in _read(tar)["records.jsonl"].splitlines()]
    assert [r.get("pruned_at") for r in records] == [None, pruned_at, pruned_at, None, None]
    assert records[1]["data"] == {} and "pruned_at" not in records[0]

    def unprune(rs: list[dict[str, object]]) -> list[dict[str, object]]:
        rs[1]["data"] = {"model": "restored"}  # a body slipped back under a pruned hash
        return rs
    _edit_records(tar, unprune)
    failed = _failed(tar, pem)
    assert failed["record chain"].seq == 2  # type: ignore[attr-defined]


def test_proofs_all_gives_one_verified_proof_per_record(audit_log: AuditLog, tmp_path: Path) -> None:
    fill(audit_log, "acme", 9)
    records = audit_log.query("acme")
    tar = export_stream(audit_log, "acme", records[2].ts, None, tmp_path / "all.tar", proofs="all")
    members = _read(tar)
    proofs = [name for name in members if name.startswith("proofs/")]
    assert proofs == [f"proofs/{seq:020d}.tlog-proof" for seq in range(3, 10)]
    pem = tmp_path / "audit.pem"
    pem.write_bytes(audit_log.public_key_pem())
    report = verify_export(tar, pem)
    assert report.ok, report.to_dict()
    assert "7 tlog-proof files verify" in report.checks[12].detail
    for name in proofs:  # each also stands alone
        proven = verify_proof(members[name].decode(), audit_log.keys.public_key, tree="acme")
        assert proven.record.seq == int(name[7:27])


def test_bad_format_and_proof_mode_are_refused(audit_log: AuditLog, tmp_path: Path) -> None:
    fill(audit_log, "acme", 1)
    with pytest.raises(AuditError, match="format: expected one of"):
        export_stream(audit_log, "acme", None, None, tmp_path / "x.tar", fmt="xml")
    with pytest.raises(AuditError, match="proofs: expected one of"):
        export_stream(audit_log, "acme", None, None, tmp_path / "x.tar", proofs="some")
    assert not (tmp_path / "x.tar").exists()


def test_range_proof_fails_on_a_forged_edge_or_proof_even_when_re_signed(audit_log: AuditLog, tmp_path: Path) -> None:
    """The range proof stands on its own: a manifest re-signed by the key holder with another tree
    edge or consistency proof still does not put the records in the signed tree."""
    fill(audit_log, "acme", 11)
    records = audit_log.query("acme")
    tar = export_stream(audit_log, "acme", records[4].ts, records[7].ts, tmp_path / "slice.tar")
    pem = tmp_path / "audit.pem"
    pem.write_bytes(audit_log.public_key_pem())
    original = _read(tar)
    manifest = json.loads(original["manifest.json"])
    assert (manifest["first_seq"], manifest["last_seq"]) == (5, 7)
    assert len(manifest["tree_edge"]) == 1 and manifest["consistency_proof"]  # 4 leaves before; 7 -> 11
    for field in ("tree_edge", "consistency_proof"):
        forged = dict(manifest, **{field: ["00" * 32, *manifest[field][1:]]})
        members = dict(original)
        members["manifest.json"] = json.dumps(forged, sort_keys=True, separators=(",", ":")).encode()
        members["manifest.sig"] = audit_log.keys.sign(members["manifest.json"]).encode()
        _write(tar, members)
        failed = _failed(tar, pem)
        assert set(failed) == {"range proof"}, (field, failed)


def _version_1_export(log: AuditLog, tar: Path, *, checkpoint_seq: int | None) -> None:
    """An export as the appliance wrote them before the Merkle trees (sovereign-audit-export/v1)."""
    records = log.query("acme")
    lines = b"".join((r.to_json_line() + "\n").encode() for r in records)
    checkpoint = None
    if checkpoint_seq is not None:
        head = records[checkpoint_seq - 1]
        fields = {"stream": "acme", "seq": head.seq, "hash": head.hash, "ts": head.ts, "key_id": log.keys.key_id}
        payload = {"type": "sovereign-audit-checkpoint/v1", **fields}
        checkpoint = {**fields, "signature": log.keys.sign(canonical_json(payload).encode())}
    manifest = {
        "type": "sovereign-audit-export/v1", "stream": "acme", "created": records[-1].ts,
        "period": {"since": None, "until": None}, "count": len(records), "first_seq": 1,
        "last_seq": records[-1].seq, "anchor_prev_hash": records[0].prev_hash, "last_hash": records[-1].hash,
        "records_file": "records.jsonl", "records_sha256": hashlib.sha256(lines).hexdigest(),
        "records_bytes": len(lines), "hash_rule": "v1", "checkpoint": checkpoint, "key_id": log.keys.key_id,
        "signature_algorithm": "ed25519",
    }
    manifest_bytes = canonical_json(manifest).encode()
    _write(tar, {"records.jsonl": lines, "manifest.json": manifest_bytes,
                 "manifest.sig": log.keys.sign(manifest_bytes).encode()})


def test_version_1_exports_still_verify(audit_log: AuditLog, tmp_path: Path) -> None:
    """Archived exports from before the Merkle trees keep verifying, with their own 11 checks."""
    fill(audit_log, "acme", 4)
    pem = tmp_path / "audit.pem"
    pem.write_bytes(audit_log.public_key_pem())
    tar = tmp_path / "v1.tar"
    _version_1_export(audit_log, tar, checkpoint_seq=3)
    report = verify_export(tar, pem)
    assert report.ok, report.to_dict()
    assert [c.name for c in report.checks][-1] == "checkpoint" and len(report.checks) == 11
    assert report.extra["version"] == 1 and "seq 3" in report.checks[10].detail
    _edit_records(tar, lambda rs: [*rs[:3], {**rs[3], "actor": "key:other"}])
    assert set(_failed(tar, pem)) == {"records digest", "record chain"}
    _version_1_export(audit_log, tar, checkpoint_seq=3)
    members = _read(tar)
    manifest = json.loads(members["manifest.json"])
    manifest["checkpoint"]["hash"] = "00" * 32  # a re-signed manifest cannot forge the checkpoint
    members["manifest.json"] = canonical_json(manifest).encode()
    members["manifest.sig"] = audit_log.keys.sign(members["manifest.json"]).encode()
    _write(tar, members)
    failed = _failed(tar, pem)
    assert set(failed) == {"checkpoint"} and "invalid" in failed["checkpoint"].detail  # type: ignore[attr-defined]
    _version_1_export(audit_log, tar, checkpoint_seq=None)
    assert verify_export(tar, pem).ok
