"""Sealed content and crypto-shredding on a real audit database (SQLite and PostgreSQL), and the
keyed prompt and output hashes of the real gateway: nothing in the database confirms a guessed
prompt, and a shredded tenant's content is gone while its records still verify and export."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from appliance.audit import AuditLog, export_stream, verify_export
from appliance.audit.content import MASTER_KEY_FILE, ContentError, ContentSealer, ContentShreddedError
from tests.appliance.audit.conftest import raw_sql, sql_rows

ACTOR = "cli:tester"
TEXT = json.dumps({"prompt": [{"role": "user", "content": "Quarterly numbers for Zürich"}], "output": "Up 4%."})


@pytest.fixture
def sealer(audit_log: AuditLog, tmp_path: Path) -> ContentSealer:
    return ContentSealer(audit_log, tmp_path / "secrets" / MASTER_KEY_FILE)


def completed(log: AuditLog, sealer: ContentSealer, tenant: str, request_id: str, text: str = TEXT) -> None:
    log.append("completed", stream=tenant, actor="key:k1", request_id=request_id,
               data={"model": "m", "output_hash": "hmac-sha256:00", "content": sealer.seal(tenant, request_id, text)})


def content_of(log: AuditLog, tenant: str, request_id: str) -> dict[str, str]:
    record, = [r for r in log.query(tenant) if r.request_id == request_id]
    return dict(record.data["content"])


def test_sealed_content_round_trips_and_nothing_readable_is_stored(
        audit_log: AuditLog, sealer: ContentSealer, tmp_path: Path) -> None:
    completed(audit_log, sealer, "acme", "req-1")
    sealed = content_of(audit_log, "acme", "req-1")
    assert set(sealed) == {"alg", "key_id", "nonce", "ciphertext"} and sealed["alg"] == "AES-256-GCM"
    assert sealer.open("acme", "req-1", sealed) == TEXT
    assert audit_log.verify().ok
    master = tmp_path / "secrets" / MASTER_KEY_FILE
    assert master.stat().st_mode & 0o777 == 0o600
    stored = json.dumps(sql_rows(audit_log, "SELECT * FROM audit_events")) + json.dumps(
        sql_rows(audit_log, "SELECT * FROM audit_content_keys"))
    assert "Zürich" not in stored and "Up 4%" not in stored
    wrapped, = sql_rows(audit_log, "SELECT wrapped FROM audit_content_keys WHERE tenant = 'acme'")
    assert len(base64.b64decode(str(wrapped[0]))) == 12 + 32 + 16  # nonce, wrapped key, tag: never the key alone


@pytest.mark.parametrize(("tenant", "request_id", "edit", "message"), [
    ("acme", "req-2", None, "expected it to authenticate for request 'req-2'"),
    ("globex", "req-1", None, "expected a data key of that tenant"),
    ("acme", "req-1", {"ciphertext": base64.b64encode(b"x" * 40).decode()}, "found a mismatch"),
    ("acme", "req-1", {"alg": "ROT13"}, "expected alg 'AES-256-GCM'"),
    ("acme", "req-1", {"nonce": "not base64!"}, "expected base64 nonce"),
])
def test_content_opens_only_for_its_own_tenant_and_request(
        audit_log: AuditLog, sealer: ContentSealer, tenant: str, request_id: str, edit: dict[str, str] | None,
        message: str) -> None:
    completed(audit_log, sealer, "acme", "req-1")
    sealer.seal("globex", "req-9", "globex has a key of its own")
    sealed = {**content_of(audit_log, "acme", "req-1"), **(edit or {})}
    with pytest.raises(ContentError, match=message):
        sealer.open(tenant, request_id, sealed)


def test_shred_erases_content_while_the_log_verifies_and_exports(
        audit_log: AuditLog, sealer: ContentSealer, tmp_path: Path) -> None:
    completed(audit_log, sealer, "acme", "req-1")
    completed(audit_log, sealer, "globex", "req-1", "globex text")
    audit_log.checkpoint()
    other_process = ContentSealer(audit_log, tmp_path / "secrets" / MASTER_KEY_FILE)  # e.g. the gateway
    assert other_process.open("acme", "req-1", content_of(audit_log, "acme", "req-1")) == TEXT

    result = sealer.shred("acme", actor=ACTOR)

    event, = [r for r in audit_log.query("_admin") if r.event_type == "admin.tenant_key_shredded"]
    assert (event.tenant, event.actor, event.data["key_ids"]) == ("acme", ACTOR, result.key_ids)
    for who in (sealer, other_process):  # no process keeps a usable copy of the key
        with pytest.raises(ContentShreddedError, match=f"was destroyed on {result.shredded_at} by {ACTOR}"):
            who.open("acme", "req-1", content_of(audit_log, "acme", "req-1"))
    assert sql_rows(audit_log, "SELECT wrapped FROM audit_content_keys WHERE tenant = 'acme'") == [(None,)]
    assert sealer.open("globex", "req-1", content_of(audit_log, "globex", "req-1")) == "globex text"
    assert audit_log.verify().ok
    pem = tmp_path / "audit.pem"
    pem.write_bytes(audit_log.public_key_pem())
    assert verify_export(export_stream(audit_log, "acme", None, None, tmp_path / "acme.tar"), pem).ok
    # new content after a shred gets a new key; the old content stays unreadable
    completed(audit_log, sealer, "acme", "req-2")
    new = content_of(audit_log, "acme", "req-2")
    assert new["key_id"] not in result.key_ids and sealer.open("acme", "req-2", new) == TEXT
    sealer.shred("globex", actor=ACTOR)
    with pytest.raises(ContentError, match="every data key of tenant 'globex' is already destroyed"):
        sealer.shred("globex", actor=ACTOR)


def test_a_wrapped_key_does_not_move_to_another_tenant(audit_log: AuditLog, sealer: ContentSealer) -> None:
    completed(audit_log, sealer, "acme", "req-1")
    sealer.seal("globex", "req-1", "x")
    raw_sql(audit_log, "UPDATE audit_content_keys SET wrapped = (SELECT wrapped FROM audit_content_keys "
                       "WHERE tenant = 'acme') WHERE tenant = 'globex'")
    with pytest.raises(ContentError, match="expected it to unwrap with the master key"):
        sealer.seal("globex", "req-2", "y")


def test_limits_and_bad_input_are_refused_clearly(audit_log: AuditLog, sealer: ContentSealer, tmp_path: Path) -> None:
    small = ContentSealer(audit_log, tmp_path / "secrets" / MASTER_KEY_FILE, max_plaintext_bytes=10)
    with pytest.raises(ContentError, match="expected at most 10 bytes, found 11"):
        small.seal("acme", "r", "x" * 11)
    assert small.seal_or_omit("acme", "r", "x" * 11) == {"omitted": "larger than 10 bytes", "bytes": 11}
    with pytest.raises(ContentError, match="expected a tenant and a request id"):
        sealer.seal("acme", "", "x")
    with pytest.raises(ContentError, match="expected the fields"):
        sealer.open("acme", "r", {"alg": "AES-256-GCM"})
    with pytest.raises(ContentError, match="expected a tenant with stored content keys, found none for 'nobody'"):
        sealer.shred("nobody", actor=ACTOR)
    with pytest.raises(ContentError, match="expected a file at"):
        ContentSealer(audit_log, tmp_path / "elsewhere" / MASTER_KEY_FILE, create=False)
    os.chmod(tmp_path / "secrets" / MASTER_KEY_FILE, 0o644)
    with pytest.raises(PermissionError, match="expected 0600"):
        ContentSealer(audit_log, tmp_path / "secrets" / MASTER_KEY_FILE)


# -- keyed hashes in the real gateway ------------------------------------------------------------

MODEL = "SmolLM2-135M-Instruct"
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[tuple[TestClient, object]]:
    from appliance.gateway import create_app
    from appliance.runtime import Runtime
    from policies import default_policy_dir

    root = tmp_path_factory.mktemp("root")
    release = root / "releases" / "1.0.0"
    shutil.copytree(default_policy_dir(), release / "policies")
    (release / "appliance.yaml").write_text(yaml.safe_dump({
        "version": "1.0.0", "model": {"name": MODEL, "path": str(model_dir)},
        "policies_dir": str(release / "policies"), "node": {"name": "node-a", "labels": {"region": "eu"}}}))
    (root / "current").symlink_to(release)
    rt = Runtime.open(root)
    for tenant in ("acme", "globex"):
        rt.tenants.create_tenant(tenant, [MODEL])
    with TestClient(create_app(rt)) as client:
        yield client, rt


@pytest.mark.slow
def test_prompt_and_output_hashes_are_keyed_per_tenant(gateway: tuple[TestClient, object]) -> None:
    client, rt = gateway
    outputs = {}
    for tenant in ("acme", "globex"):
        key = rt.tenants.issue_key(tenant).secret  # type: ignore[attr-defined]
        resp = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                           json={"model": MODEL, "messages": [{"role": "user", "content": QUESTION}],
                                 "max_tokens": 8, "temperature": 0})
        assert resp.status_code == 200, resp.text
        outputs[tenant] = resp.json()["choices"][0]["message"]["content"]
    assert outputs["acme"] == outputs["globex"]  # same prompt, same greedy answer ...
    audit: AuditLog = rt.audit  # type: ignore[attr-defined]
    records = {t: {r.event_type: r.data for r in audit.query(t)} for t in ("acme", "globex")}
    for field, event in (("prompt_hash", "accepted"), ("output_hash", "completed")):
        acme, globex = records["acme"][event][field], records["globex"][event][field]
        assert acme.startswith("hmac-sha256:") and acme != globex  # ... different hashes
    everything = json.dumps(sql_rows(audit.engine.url.render_as_string(hide_password=False),
                                     "SELECT data FROM audit_events"))
    for plain in (QUESTION, outputs["acme"]):
        assert hashlib.sha256(plain.encode()).hexdigest() not in everything
    assert QUESTION not in everything


def test_gateways_sealing_a_new_tenant_at_once_agree_on_one_key(audit_log: AuditLog, tmp_path: Path) -> None:
    sealers = [ContentSealer(audit_log, tmp_path / "secrets" / MASTER_KEY_FILE) for _ in range(4)]
    sealed: list[tuple[str, dict[str, str]]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(len(sealers))

    def work(i: int, sealer: ContentSealer) -> None:
        try:
            start.wait(timeout=60)
            for j in range(5):
                sealed.append((f"r{i}-{j}", sealer.seal("acme", f"r{i}-{j}", f"text {i} {j}")))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i, s)) for i, s in enumerate(sealers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(sealed) == 20
    for request_id, blob in sealed:
        i, j = request_id[1:].split("-")
        assert sealers[0].open("acme", request_id, blob) == f"text {i} {j}"
    assert len({s.seal("acme", "after", "x")["key_id"] for s in sealers}) == 1
