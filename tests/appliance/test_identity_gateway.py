"""Identity at the gateway over real HTTPS with the real engine: the official `openai` client with
tenant keys, the admin API with a named admin's key, keys checked before a body is read, scopes,
expiry, disabled and deleted tenants, bounded auditing of failed authentications, and the tenant
self-service routes (usage, audit export)."""

from __future__ import annotations

import io
import json
import shutil
import socket
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from fastapi import FastAPI
from openai.types.chat import ChatCompletionMessageParam

from appliance.gateway.auth_audit import AuthFailureAudit
from appliance.gateway.edge import EdgeLimits
from appliance.runtime import Runtime
from appliance.server import build_server
from policies import default_policy_dir
from tests.appliance.support import free_port, tls_ctx, wait_healthy

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"
QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the capital of France?"}]
WINDOW_S = 6.0


@dataclass
class Gateway:
    runtime: Runtime
    url: str
    ca: Path
    admin_key: str
    port: int

    def http(self, key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, verify=tls_ctx(self.ca), headers=headers, timeout=60)

    def openai(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0,
                             http_client=httpx.Client(verify=tls_ctx(self.ca), timeout=120))

    def tenant_key(self, tenant: str, scopes: list[str] | None = None, models: list[str] | None = None,
                   expires: str | None = None) -> tuple[str, str]:
        """A new tenant (granted the model unless told otherwise) and a key, through the admin API."""
        with self.http(self.admin_key) as admin:
            grants = [MODEL] if models is None else models
            made = admin.post("/admin/v1/tenants", json={"name": tenant, "models": grants})
            assert made.status_code in (201, 409), made.text
            body = {"label": "test", "scopes": scopes or ["inference"]} | ({"expires": expires} if expires else {})
            resp = admin.post(f"/admin/v1/tenants/{tenant}/keys", json=body)
            assert resp.status_code == 201, resp.text
            return str(resp.json()["key"]), str(resp.json()["key_id"])


def _lay_out_root(root: Path, model_dir: Path) -> Path:
    release = root / "releases" / "1.0.0"
    policies = release / "policies"
    shutil.copytree(default_policy_dir(), policies)
    (release / "appliance.yaml").write_text(yaml.safe_dump({
        "version": "1.0.0", "bundle_digest": "sha256:test",
        "model": {"name": MODEL, "path": str(model_dir)}, "policies_dir": str(policies),
        "node": {"name": "node-a", "labels": {"region": "eu-test", "site": "lab", "classification": "internal"}},
        "gateway": {"host": "127.0.0.1", "port": 8443},
    }))
    (root / "current").symlink_to(release)
    return root


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Gateway]:
    root = _lay_out_root(tmp_path_factory.mktemp("root"), model_dir)
    # An install of the release before named admins: the runtime must migrate its shared token.
    (root / "secrets").mkdir(mode=0o700)
    (root / "secrets" / "admin.token").write_text("shared-token-of-the-old-release\n")
    (root / "secrets" / "admin.token").chmod(0o600)
    runtime = Runtime.open(root)
    admin_key = (root / "secrets" / "admin.key").read_text().strip()
    port = free_port()
    # The edge's refusal budget (429 after 60 refusals a minute per client) would answer this
    # module's deliberate 401 floods before authentication does; it has its own tests.
    server = build_server(runtime, "127.0.0.1", port, EdgeLimits(refusals_per_minute=100_000))
    # the shipped bounds with a short window, so that a summary comes within the test
    app = server.config.app
    assert isinstance(app, FastAPI)
    app.state.auth_failures = AuthFailureAudit(per_client=10, total=200, window_s=WINDOW_S)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url, ca = f"https://localhost:{port}", root / "tls" / "ca.pem"
    wait_healthy(None, url, ca)
    yield Gateway(runtime, url, ca, admin_key, port)
    server.should_exit = True
    thread.join(timeout=60)


def _auth_records(gw: Gateway) -> list[dict[str, object]]:
    return [{"actor": r.actor, **r.data} for r in gw.runtime.audit.query("_admin")
            if r.event_type == "admin.auth_failed"]


def test_shared_token_was_migrated_and_named_admin_actions_are_audited(gateway: Gateway) -> None:
    root = gateway.runtime.config.root
    assert not (root / "secrets" / "admin.token").exists()
    with gateway.http("shared-token-of-the-old-release") as old:
        assert old.get("/admin/v1/tenants").status_code == 401
    key, _ = gateway.tenant_key("audited")
    records = [r for r in gateway.runtime.audit.query("_admin") if r.event_type in
               ("admin.tenant_created", "admin.key_issued") and r.data.get("tenant") == "audited"]
    assert [r.actor for r in records] == ["admin:admin", "admin:admin"]
    admin_key_id = gateway.admin_key.split("_")[1]
    assert all(r.data["by_key_id"] == admin_key_id for r in records)
    everything = json.dumps([r.data for r in gateway.runtime.audit.query("_admin")])
    assert key.split("_", 2)[2] not in everything and gateway.admin_key.split("_", 2)[2] not in everything


def test_granted_tenant_chats_through_openai_and_ungranted_one_is_refused(gateway: Gateway) -> None:
    key, key_id = gateway.tenant_key("granted")
    reply = gateway.openai(key).chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0)
    assert reply.choices[0].message.content
    bare, _ = gateway.tenant_key("no-grant", models=[])
    with pytest.raises(openai.PermissionDeniedError) as refused:
        gateway.openai(bare).chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8)
    assert refused.value.code == "model_not_allowed"
    # last use is recorded (at most once a minute per key, in a worker thread)
    deadline = time.monotonic() + 10
    while gateway.runtime.tenants.get_key(key_id).last_used_at is None:  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "last_used_at never written"
        time.sleep(0.1)


@pytest.mark.parametrize(("key", "code"), [("", "missing_api_key"), ("not-a-key", "invalid_api_key"),
                                           ("sov_0123456789abcdef_" + "x" * 43, "invalid_api_key")])
def test_missing_and_bad_keys_get_401_with_bearer_challenge(gateway: Gateway, key: str, code: str) -> None:
    with gateway.http(key or None) as client:
        resp = client.post("/v1/chat/completions", json={"model": MODEL, "messages": QUESTION})
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
    assert resp.json()["error"]["code"] == code and set(resp.json()["error"]) == {"message", "type", "param", "code"}


def test_a_bad_key_is_refused_before_the_body_is_read(gateway: Gateway) -> None:
    """Announce a 4 MB body (the edge's cap), send none of it: the 401 comes back at once, long before
    the edge's 30 s body deadline would end a wait for it."""
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer sov_0123456789abcdef_"
            f"{'y' * 43}\r\nContent-Type: application/json\r\nContent-Length: {4 * 1024 * 1024}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=20) as raw, \
            tls_ctx(gateway.ca).wrap_socket(raw, server_hostname="localhost") as conn:
        conn.sendall(head)
        answer = b""
        while b"invalid_api_key" not in answer:
            chunk = conn.recv(65536)  # the socket's 20 s timeout fails the test if the 401 never comes
            if not chunk:
                break
            answer += chunk
    text = answer.decode("latin-1")
    assert text.startswith("HTTP/1.1 401"), text[:200]
    assert "invalid_api_key" in text and "connection: close" in text.lower()  # the unread body is not parsed


def test_expired_key_gets_its_own_401(gateway: Gateway) -> None:
    key, _ = gateway.tenant_key("expiring", expires="2s")
    time.sleep(2.2)
    with pytest.raises(openai.AuthenticationError) as refused:
        gateway.openai(key).chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4)
    assert refused.value.code == "expired_api_key"


def test_scopes_are_enforced_naming_the_scope_needed(gateway: Gateway) -> None:
    audit_only, _ = gateway.tenant_key("auditor", scopes=["audit:read"])
    with pytest.raises(openai.PermissionDeniedError) as refused:
        gateway.openai(audit_only).chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4)
    assert refused.value.code == "insufficient_scope" and "'inference'" in refused.value.message
    tenant_key, _ = gateway.tenant_key("not-admin")
    with gateway.http(tenant_key) as client:
        resp = client.get("/admin/v1/tenants")
    assert resp.status_code == 403 and "'admin'" in resp.json()["error"]["message"]
    with pytest.raises(openai.PermissionDeniedError):
        gateway.openai(gateway.admin_key).chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4)


def test_disable_revoke_and_delete_take_effect_at_once(gateway: Gateway) -> None:
    key, key_id = gateway.tenant_key("lifecycle")
    client = gateway.openai(key)
    assert client.models.list() is not None  # a valid, now cached key
    with gateway.http(gateway.admin_key) as admin:
        assert admin.post("/admin/v1/tenants/lifecycle/disable").status_code == 200
        with pytest.raises(openai.PermissionDeniedError) as refused:
            client.models.list()
        assert refused.value.code == "tenant_disabled"
        assert admin.patch("/admin/v1/tenants/lifecycle", json={"disabled": False}).status_code == 200
        client.models.list()
        assert admin.delete(f"/admin/v1/keys/{key_id}").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
        other, _ = gateway.tenant_key("lifecycle")
        deleted = admin.delete("/admin/v1/tenants/lifecycle")
        assert deleted.status_code == 200 and len(deleted.json()["revoked_key_ids"]) == 1
        with pytest.raises(openai.AuthenticationError):
            gateway.openai(other).models.list()
        assert admin.post("/admin/v1/tenants", json={"name": "lifecycle"}).status_code == 409
        listed = admin.get("/admin/v1/keys", params={"tenant": "lifecycle", "include_revoked": True}).json()["data"]
        assert {k["state"] for k in listed} == {"revoked"} and all("key" not in k for k in listed)


def test_rotation_through_the_admin_api_keeps_the_old_key_for_its_grace(gateway: Gateway) -> None:
    key, key_id = gateway.tenant_key("rotating")
    with gateway.http(gateway.admin_key) as admin:
        rotated = admin.post(f"/admin/v1/keys/{key_id}/rotate", json={"grace": "1h"})
        assert rotated.status_code == 201, rotated.text
        bad = admin.post(f"/admin/v1/keys/{key_id}/rotate", json={"grace": "soon"})
        assert bad.status_code == 400 and "duration" in bad.json()["error"]["message"]
    gateway.openai(key).models.list()  # still inside the grace period
    gateway.openai(rotated.json()["key"]).models.list()


def test_admins_made_through_the_api_act_under_their_own_name(gateway: Gateway) -> None:
    with gateway.http(gateway.admin_key) as admin:
        made = admin.post("/admin/v1/admins", json={"name": "bob"})
        assert made.status_code == 201, made.text
        assert admin.post("/admin/v1/admins", json={"name": "bob"}).status_code == 409
        assert admin.post("/admin/v1/admins/admin/disable").status_code == 400  # not itself
    with gateway.http(made.json()["key"]) as bob:
        extra = bob.post("/admin/v1/admins/bob/keys", json={"label": "laptop", "expires": "1d"})
        assert extra.status_code == 201 and extra.json()["expires_at"]
        assert bob.post("/admin/v1/tenants", json={"name": "bobs", "models": []}).status_code == 201
    created = [r for r in gateway.runtime.audit.query("_admin") if r.event_type == "admin.tenant_created"
               and r.data.get("tenant") == "bobs"]
    assert [r.actor for r in created] == ["admin:bob"]
    with gateway.http(gateway.admin_key) as admin:
        assert admin.post("/admin/v1/admins/bob/disable").status_code == 200
    with gateway.http(extra.json()["key"]) as bob:
        refused = bob.get("/admin/v1/tenants")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_disabled"


def test_failed_authentications_are_audited_but_bounded_per_client(gateway: Gateway) -> None:
    time.sleep(WINDOW_S)  # a fresh window: earlier tests' failures are in the last one
    with gateway.http(None) as client:
        client.get("/health")  # rolls the window over
        before = len(_auth_records(gateway))
        for i in range(40):
            bad = f"sov_{i:016x}_{'z' * 43}"
            assert client.get("/v1/models", headers={"Authorization": f"Bearer {bad}"}).status_code == 401
        written = _auth_records(gateway)[before:]
        time.sleep(WINDOW_S)
        client.get("/health")  # the first request after the window writes its summary
    assert 10 <= len(written) <= 20  # 10 per client per window (20 if the flood straddled two windows)
    assert all(r["client"] == "127.0.0.1" and r["reason"] == "invalid_api_key" for r in written)
    assert all(str(r["actor"]).startswith("key:") and r["key_id"] for r in written)
    deadline = time.monotonic() + 10
    while True:  # written in the background; an earlier window's summary may already be there
        summaries = [r.data for r in gateway.runtime.audit.query("_admin")
                     if r.event_type == "admin.auth_failed_summary"]
        if sum(int(s["by_client"].get("127.0.0.1", 0)) for s in summaries) >= 40 - len(written):
            break
        assert time.monotonic() < deadline, f"the suppressed failures were not summarised: {summaries}"
        time.sleep(0.1)
    assert "z" * 43 not in json.dumps(written) + json.dumps(summaries)


def test_usage_and_own_audit_export(gateway: Gateway) -> None:
    key, _ = gateway.tenant_key("selfserve", scopes=["inference", "audit:read"])
    gateway.openai(key).chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, temperature=0)
    gateway.tenant_key("bystander")
    with gateway.http(key) as client:
        usage = client.get("/v1/usage")
        assert usage.status_code == 200, usage.text
        body = usage.json()
        assert body["tenant"] == "selfserve" and set(body["day"]) >= {"tokens", "requests", "limit", "remaining"}
        exported = client.get("/v1/audit/export", params={"since": "2000-01-01T00:00:00+00:00"})
        assert exported.status_code == 200, exported.text
        bad = client.get("/v1/audit/export", params={"since": "last week"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "since"
    with tarfile.open(fileobj=io.BytesIO(exported.content)) as tar:
        names = tar.getnames()
        records = [json.loads(line) for line in tar.extractfile(  # type: ignore[union-attr]
            next(n for n in names if n.endswith(".jsonl"))).read().splitlines()]
    assert records and {r["stream"] for r in records} == {"selfserve"}
    assert {"accepted", "completed"} <= {r["event_type"] for r in records}
    inference_only, _ = gateway.tenant_key("selfserve")
    with gateway.http(inference_only) as client:
        assert client.get("/v1/usage").status_code == 200
        refused = client.get("/v1/audit/export")
    assert refused.status_code == 403 and "'audit:read'" in refused.json()["error"]["message"]

