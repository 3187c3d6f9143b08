"""The witness as a real process (the CLI on a loopback port), attacked the ways the protocol must refuse.

Each test drives a real ``AuditLog`` on SQLite and talks to the witness over real HTTP (and, in
one test, mutual TLS), with the appliance's ``WitnessClient`` or raw requests where the attack
needs a request the client would never send.
"""

from __future__ import annotations

import base64
import http.client
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa

from appliance.audit import AuditKeys, AuditLog
from appliance.audit.anchoring import Anchoring
from appliance.audit.checkpoint import GLOBAL_TREE, Checkpoint, log_verifier, sign_checkpoint
from appliance.audit.merkle import MemoryNodes, consistency_proof, leaf_hash, record_leaf
from appliance.audit.note import SignedNote
from appliance.audit.witness import parse_vkey
from appliance.audit.witness_cli import run_verify_anchors
from appliance.audit.witness_client import WitnessClient, WitnessConflict, WitnessRefused, WitnessSubmitter
from tests.appliance.audit.anchor_helpers import (
    Witness,
    cut_to,
    fill,
    log_vkey,
    run_cli,
    start_witness,
    witness_key,
)


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'audit.db'}"


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    return tmp_path / "secrets" / "audit-signing.key"


@pytest.fixture
def log(url: str, key_path: Path) -> Iterator[AuditLog]:
    audit = AuditLog(url, key_path, checkpoint_every=None)
    yield audit
    audit.close()


@pytest.fixture
def witness(tmp_path: Path, log: AuditLog, key_path: Path) -> Iterator[Witness]:
    key, vkey = witness_key(tmp_path)
    w = start_witness(key, vkey, tmp_path / "witness-state", [log_vkey(key_path)])
    yield w
    w.stop()


def _post(w_url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    parts = urlsplit(w_url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    try:
        conn.request("POST", "/add-checkpoint", body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read().decode()
    finally:
        conn.close()


def _request(old: int, proof: list[bytes], note: str) -> bytes:
    return (f"old {old}\n" + "".join(base64.b64encode(h).decode() + "\n" for h in proof) + "\n" + note).encode()


def _newest(log: AuditLog) -> Checkpoint:
    log.checkpoint()
    return log.checkpoints(GLOBAL_TREE)[-1]


def _submitter(log: AuditLog, w: Witness) -> WitnessSubmitter:
    return WitnessSubmitter(log.engine, WitnessClient(w.url, w.vkey, timeout_s=30), interval_s=0.1)


def test_cosigns_consistent_checkpoints_stores_them_and_verification_demands_them(
        log: AuditLog, witness: Witness, url: str, key_path: Path) -> None:
    submitter = _submitter(log, witness)
    fill(log, 5)
    first = submitter.submit_now(_newest(log))
    assert first.signed_by(parse_vkey(witness.vkey)) and first.signed_by(log_verifier(log.keys.public_key))
    fill(log, 9)
    second = _newest(log)
    submitter.submit_now(second)  # old 5, a real consistency proof 5 -> 14
    with log.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT tree, size, witness FROM audit_cosignatures ORDER BY id")).all()
    assert [tuple(r) for r in rows] == [(GLOBAL_TREE, 5, "test-witness"), (GLOBAL_TREE, 14, "test-witness")]
    held = SignedNote.parse(next((witness.state / "logs").iterdir()).read_text()).checkpoint()
    assert (held.size, held.root.hex()) == (14, second.root)
    assert run_verify_anchors(url, key=key_path, witness_keys=[witness.vkey], require_witness=True) == 0
    # Without a cosignature, --require-witness fails: a log nobody witnessed is not accepted.
    with log.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM audit_cosignatures"))
    assert run_verify_anchors(url, key=key_path, witness_keys=[witness.vkey], require_witness=True) == 1


def test_old_size_mismatch_is_409_with_the_witness_size_and_the_client_recovers(
        log: AuditLog, witness: Witness) -> None:
    fill(log, 6)
    _submitter(log, witness).submit_now(_newest(log))
    fill(log, 3)
    cp = _newest(log)
    status, content_type, body = _post(witness.url, _request(2, consistency_proof(_nodes(log), 2, 9), cp.note))
    assert (status, content_type, body) == (409, "text/x.tlog.size", "6\n")
    # A client that does not know the witness's size (its table lost) learns it from the 409.
    with log.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM audit_cosignatures"))
    cosigned = _submitter(log, witness).submit_now(cp)
    assert cosigned.checkpoint().size == 9


def test_forged_log_signature_is_403_and_unknown_origin_404(log: AuditLog, witness: Witness, tmp_path: Path) -> None:
    fill(log, 3)
    real = _newest(log)
    impostor = AuditKeys(tmp_path / "other" / "impostor.key")
    body = SignedNote.parse(real.note).body
    # The real log's name and key id on the line, but the impostor's signature over the body.
    verifier = log_verifier(log.keys.public_key)
    forged_sig = base64.b64encode(verifier.id + base64.b64decode(impostor.sign(body.encode()))).decode()
    forged = f"{body}\n\u2014 {verifier.name} {forged_sig}\n"
    status, _, text = _post(witness.url, _request(0, [], forged))
    assert status == 403 and "expected a valid signature" in text
    foreign = sign_checkpoint(impostor, tree=GLOBAL_TREE, size=real.size, root=bytes.fromhex(real.root), ts=real.ts)
    status, _, text = _post(witness.url, _request(0, [], foreign.note))
    assert status == 404 and "expected a log this witness is configured for" in text
    assert list((witness.state / "logs").iterdir()) == []  # nothing cosigned, nothing stored


def test_huge_body_is_413_and_malformed_bodies_400(log: AuditLog, witness: Witness) -> None:
    parts = urlsplit(witness.url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    conn.putrequest("POST", "/add-checkpoint")
    conn.putheader("Content-Length", str(50 * 1024 * 1024))
    conn.endheaders()  # the 50 MiB body is never sent: the witness answers from the header
    response = conn.getresponse()
    assert response.status == 413 and "expected at most 65536 bytes" in response.read().decode()
    conn.close()
    fill(log, 2)
    note = _newest(log).note
    for body, fragment in [(b"old 01\n\n" + note.encode(), "no leading zeros"),
                           (b"old 0\nnot-base64!\n\n" + note.encode(), "proof line 1"),
                           (b"old 0\n" + note.encode(), "consistency proof line 1"),
                           (b"old 0\n\nsome-origin\n5\nAAAA\n\n", "checkpoint: "),
                           (b"old 0\n\n\xff\xfe", "UTF-8"),
                           ((("old 0\n" + "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n" * 64) + "\n").encode()
                            + note.encode(), "at most 63")]:
        status, _, text = _post(witness.url, body)
        assert status == 400 and fragment in text, (body[:40], text)


def test_stale_or_rolled_back_checkpoint_is_refused(log: AuditLog, witness: Witness) -> None:
    fill(log, 4)
    older = _newest(log)
    fill(log, 4)
    newer = _newest(log)
    submitter = _submitter(log, witness)
    submitter.submit_now(newer)
    # Replaying the older checkpoint: as the client would (old = witness size 8 > 4) and as a
    # stale client would (old = 0): neither rolls the witness back.
    status, _, text = _post(witness.url, _request(8, [], older.note))
    assert status == 400 and "expected at most the checkpoint size 4, found 8" in text
    status, _, text = _post(witness.url, _request(0, [], older.note))
    assert (status, text) == (409, "8\n")
    with pytest.raises(WitnessRefused, match="has cosigned 8 records"):
        submitter.submit_now(older)
    held = SignedNote.parse(next((witness.state / "logs").iterdir()).read_text()).checkpoint()
    assert held.size == 8


def test_restarted_witness_keeps_its_state_and_a_second_one_cannot_share_it(
        log: AuditLog, witness: Witness, key_path: Path) -> None:
    fill(log, 5)
    _submitter(log, witness).submit_now(_newest(log))
    witness.stop()
    again = start_witness(witness.key, witness.vkey, witness.state, [log_vkey(key_path)])
    try:
        fill(log, 1)
        status, _, text = _post(again.url, _request(0, [], _newest(log).note))
        assert (status, text) == (409, "5\n")  # it remembers size 5 across the restart
        second = run_cli("witness", "serve", "--key", str(witness.key), "--state", str(witness.state),
                         "--log", log_vkey(key_path), "--listen", "127.0.0.1:0", timeout=60)
        assert second.returncode == 2 and "locked by another process" in second.stderr
    finally:
        again.stop()


def test_insider_with_the_signing_key_rewrites_history_the_witness_refuses_and_anchors_catch_it(
        log: AuditLog, witness: Witness, url: str, key_path: Path) -> None:
    fill(log, 10)
    _submitter(log, witness).submit_now(_newest(log))  # the witness holds size 10
    log.close()
    # The insider cuts the log to 6 records and writes 8 different ones, signed with the real key.
    cut_to(url, 6)
    rewritten = AuditLog(url, key_path, checkpoint_every=None)
    try:
        fill(rewritten, 8, tag="rewritten")
        cp = _newest(rewritten)
        assert cp.size == 14
        assert rewritten.verify().ok  # the database alone cannot tell
        with pytest.raises(WitnessRefused) as refused:
            _submitter(rewritten, witness).submit_now(cp)
        assert refused.value.status == 422
        assert any((witness.state / "evidence").iterdir())  # the log's own signed rewrite, kept
        held = SignedNote.parse(next((witness.state / "logs").iterdir()).read_text()).checkpoint()
        assert held.size == 10
        assert run_verify_anchors(url, key=key_path, anchors=[witness.state]) == 1
    finally:
        rewritten.close()


def test_mutual_tls_witness_accepts_only_clients_of_its_ca(log: AuditLog, tmp_path: Path, key_path: Path) -> None:
    from tests.engine.tls_certs import make_tls_set

    tls = make_tls_set(tmp_path)
    key, vkey = witness_key(tmp_path, "tls-witness")
    w = start_witness(key, vkey, tmp_path / "tls-state", [log_vkey(key_path)], "--tls-cert", str(tls.server.cert),
                      "--tls-key", str(tls.server.key), "--client-ca", str(tls.ca))
    try:
        assert w.url.startswith("https://")
        fill(log, 3)
        cp = _newest(log)
        good = WitnessClient(w.url, vkey, ca=tls.ca, client_cert=tls.client.cert, client_key=tls.client.key)
        assert WitnessSubmitter(log.engine, good).submit_now(cp).checkpoint().size == 3
        for client in (WitnessClient(w.url, vkey, ca=tls.ca),
                       WitnessClient(w.url, vkey, ca=tls.ca, client_cert=tls.rogue_client.cert,
                                     client_key=tls.rogue_client.key)):
            with pytest.raises(WitnessRefused, match="unreachable"):
                client.add_checkpoint(cp.note, 3, [])
    finally:
        w.stop()


def test_client_refuses_a_cosignature_from_another_key(log: AuditLog, witness: Witness, tmp_path: Path) -> None:
    _, other_vkey = witness_key(tmp_path / "other", "test-witness")  # same name, another key
    fill(log, 2)
    with pytest.raises(WitnessRefused, match="expected a valid cosignature"):
        WitnessClient(witness.url, other_vkey).add_checkpoint(_newest(log).note, 0, [])
    with pytest.raises(ValueError, match="cosignature key"):
        WitnessClient(witness.url, log_verifier(log.keys.public_key).text())
    with pytest.raises(ValueError, match="http"):
        WitnessClient("ftp://127.0.0.1:1", witness.vkey)


def test_conflict_carries_the_size(log: AuditLog, witness: Witness) -> None:
    fill(log, 3)
    _submitter(log, witness).submit_now(_newest(log))
    fill(log, 1)
    with pytest.raises(WitnessConflict) as conflict:
        WitnessClient(witness.url, witness.vkey).add_checkpoint(_newest(log).note, 1, [leaf_hash(b"x")])
    assert conflict.value.size == 3


def _nodes(log: AuditLog) -> MemoryNodes:
    with log.engine.connect() as conn:
        hashes = conn.execute(sa.text("SELECT hash FROM audit_events ORDER BY gidx")).scalars().all()
    return MemoryNodes([record_leaf(h) for h in hashes])


def test_anchoring_publishes_and_gets_cosignatures_on_its_own_threads(
        log: AuditLog, witness: Witness, tmp_path: Path, url: str, key_path: Path) -> None:
    log.close()
    pub = tmp_path / "pub"
    pub.mkdir()
    anchoring = Anchoring(publish_dir=pub, witness=WitnessClient(witness.url, witness.vkey, timeout_s=30),
                          witness_interval_s=0.2)
    running = AuditLog(url, key_path, checkpoint_every=5, checkpoint_interval_s=0.2,
                       on_checkpoints=anchoring.on_checkpoints)
    anchoring.start(running)
    try:
        fill(running, 12)
        newest = running.checkpoint()
        assert newest
    finally:
        anchoring.stop(30)  # a last submission of the newest checkpoint, then the last publication
        running.close()
    assert anchoring.submitter is not None and anchoring.submitter.cosigned >= 1
    final = SignedNote.parse((pub / GLOBAL_TREE / "latest").read_text())
    assert final.checkpoint().size == 12 and final.signed_by(parse_vkey(witness.vkey))
    assert run_verify_anchors(url, key=key_path, anchors=[pub], witness_keys=[witness.vkey],
                              require_witness=True) == 0
    # The witness gone: appends and checkpoints go on, the failure is counted and logged, not raised.
    witness.stop()
    again = AuditLog(url, key_path, checkpoint_every=None, on_checkpoints=anchoring.on_checkpoints)
    anchoring.submitter = None
    anchoring.start(again)
    try:
        fill(again, 2)
        again.checkpoint()
    finally:
        anchoring.stop(30)
        again.close()
    assert anchoring.submitter is not None and anchoring.submitter.failures >= 1


def test_witness_streams_gets_every_tree_cosigned(log: AuditLog, witness: Witness) -> None:
    anchoring = Anchoring(witness=WitnessClient(witness.url, witness.vkey, timeout_s=30), witness_interval_s=0.1,
                          witness_streams=True)
    anchoring.start(log)
    try:
        fill(log, 4, stream="acme")
        fill(log, 2, stream="beta")
        anchoring.on_checkpoints(log.checkpoint())  # this log has no hook: hand them over as the writer would
    finally:
        anchoring.stop(30)
    with log.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT tree, size FROM audit_cosignatures ORDER BY tree")).all()
    assert [tuple(r) for r in rows] == [(GLOBAL_TREE, 6), ("acme", 4), ("beta", 2)]
    assert sorted(p.name for p in (witness.state / "logs").iterdir()) == sorted(
        f"sovereign-audit%2F{log.keys.key_id[:16]}%2F{t}.checkpoint" for t in (GLOBAL_TREE, "acme", "beta"))


def test_asking_the_witness_catches_a_cut_that_the_stored_cosignatures_no_longer_show(
        log: AuditLog, witness: Witness, url: str, key_path: Path) -> None:
    submitter = _submitter(log, witness)
    fill(log, 5)
    submitter.submit_now(_newest(log))
    fill(log, 5)
    submitter.submit_now(_newest(log))  # the witness holds 10
    log.close()
    cut_to(url, 7)  # the insider also deletes the cosignature of size 10 and keeps the one of size 5
    resigned = AuditLog(url, key_path, checkpoint_every=None)
    resigned.checkpoint()
    resigned.close()
    assert run_verify_anchors(url, key=key_path, witness_keys=[witness.vkey], require_witness=True) == 0
    assert run_verify_anchors(url, key=key_path, witness_keys=[witness.vkey], witness_urls=[witness.url],
                              require_witness=True) == 1
    held = WitnessClient(witness.url, witness.vkey).fetch_checkpoint(f"sovereign-audit/{log.keys.key_id[:16]}/_all")
    assert held is not None and held.checkpoint().size == 10
    assert WitnessClient(witness.url, witness.vkey).fetch_checkpoint("sovereign-audit/unknown/_all") is None
    assert run_verify_anchors(url, key=key_path, witness_urls=[witness.url]) == 2  # a URL needs its key
