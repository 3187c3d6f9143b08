"""C2SP signed notes: verifier keys round-trip (base64 holds '+'), checkpoints parse strictly,
signatures and cosignatures verify only for their key, body and timestamp."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.audit.note import (
    SIG_COSIGNATURE,
    CheckpointBody,
    NoteError,
    NoteSigner,
    SignedNote,
    parse_verifier_key,
)


def test_verifier_keys_round_trip_whatever_their_base64_holds() -> None:
    for sig_type in (0x01, SIG_COSIGNATURE):
        for _ in range(200):
            signer = NoteSigner("example.com/log", Ed25519PrivateKey.generate(), sig_type)
            text = signer.verifier.text()
            parsed = parse_verifier_key(text)
            assert parsed.id == signer.verifier.id and parsed.text() == text
    with pytest.raises(NoteError, match="does not match"):
        good = NoteSigner("a", Ed25519PrivateKey.generate()).verifier.text()
        name, _hex_id, blob = good.split("+", 2)
        parse_verifier_key(f"{name}+{'00' * 4}+{blob}")


def test_checkpoints_sign_cosign_and_parse_strictly() -> None:
    log = NoteSigner("example.com/log", Ed25519PrivateKey.generate())
    witness = NoteSigner("w.example/1", Ed25519PrivateKey.generate(), SIG_COSIGNATURE)
    body = CheckpointBody("example.com/log/acme", 7, b"\x11" * 32).text()
    note = SignedNote(body, (log.sign(body),)).with_signature(witness.cosign(body, 1_700_000_000))
    parsed = SignedNote.parse(note.text())
    assert parsed.checkpoint() == CheckpointBody("example.com/log/acme", 7, b"\x11" * 32)
    assert parsed.signed_by(log.verifier) and parsed.signed_by(witness.verifier)
    assert parsed.cosignature_time(witness.verifier) == 1_700_000_000
    other = NoteSigner("example.com/log", Ed25519PrivateKey.generate())
    assert not parsed.signed_by(other.verifier)
    forged = SignedNote(body.replace("\n7\n", "\n8\n"), parsed.signatures)
    assert not forged.signed_by(log.verifier) and not forged.signed_by(witness.verifier)
    for bad, match in (("x\n1\n", "lines"), ("o\n01\n" + "A" * 44 + "\n", "leading zeros"),
                       ("o\n1\nAAAA\n", "32 bytes"), ("o\n1\n" + "A" * 43 + "=\nextra\n", "extension")):
        with pytest.raises(NoteError, match=match):
            CheckpointBody.parse(bad)
    with pytest.raises(NoteError, match="blank line"):
        SignedNote.parse(body)
