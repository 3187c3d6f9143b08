"""Who did what, from where (AU-2/AU-3), over real HTTPS with the real engine and the real audit log:
every request record carries the client's address and user agent and the run id, refusals are
recorded once whoever answers them (the edge, authentication, a route, the service), exports and
verifications through the API are recorded, the flood of unauthenticated refusals is bounded, a
presented secret is nowhere in the database, and a run writes its reconciliation first."""

from __future__ import annotations

import json
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

from appliance.audit import AuditRecord
from appliance.gateway.auth_audit import AuthFailureAudit
from appliance.gateway.edge import EdgeLimits
from appliance.runtime import Runtime
from appliance.server import build_server
from tests.appliance.runtime_root import MODEL, lay_out_root
from tests.appliance.support import free_port, tls_ctx, wait_healthy

pytestmark = pytest.mark.slow
WINDOW_S = 5.0
PER_CLIENT = 3
QUESTION = [{"role": "user", "content": "Say hello."}]


@dataclass
class Gateway:
    runtime: Runtime
    url: str
    ca: Path
    port: int
    admin_key: str
    keys: dict[str, str]  # tenant acme: "inference", "audit" (audit:read)

    def http(self, key: str | None, **headers: str | bytes) -> httpx.Client:
        auth = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, verify=tls_ctx(self.ca), headers={**auth, **headers}, timeout=60)

    def records(self, stream: str) -> list[AuditRecord]:
        return self.runtime.audit.query(stream)

    def by_x_request_id(self, stream: str, x_request_id: str) -> list[AuditRecord]:
        return [r for r in self.records(stream) if r.data.get("x_request_id") == x_request_id]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Gateway]:
    root = lay_out_root(tmp_path_factory.mktemp("root"), model_dir)
    runtime = Runtime.open(root)
    admin_key = runtime.tenants.admins.create_admin("admin", "test").secret
    runtime.tenants.create_tenant("acme", [MODEL])
    keys = {"inference": runtime.tenants.issue_key("acme", "app").secret,
            "audit": runtime.tenants.issue_key("acme", "officer", scopes=["audit:read"]).secret}
    port = free_port()
    server = build_server(runtime, "127.0.0.1", port, EdgeLimits(refusals_per_minute=40, max_body_bytes=64 * 1024))
    app = server.config.app
    assert isinstance(app, FastAPI)
    app.state.refusal_audit = AuthFailureAudit(per_client=PER_CLIENT, total=10, window_s=WINDOW_S)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url, ca = f"https://localhost:{port}", root / "tls" / "ca.pem"
    wait_healthy(None, url, ca)
    yield Gateway(runtime, url, ca, port, admin_key, keys)
    server.should_exit = True
    thread.join(timeout=60)


def _cleaned(raw: str) -> str:
    """What the log keeps of a user agent: control characters replaced, 256 characters at most."""
    text = "".join("\ufffd" if ord(c) < 32 or 127 <= ord(c) < 160 else c for c in raw)
    return text if len(text) <= 256 else text[:255] + "…"


def test_every_record_of_a_request_says_who_from_where_and_which_run(gateway: Gateway) -> None:
    agent = "coverage\tagent\x85" + "x" * 400  # a tab and a C1 control (NEL) travel in a header value
    with gateway.http(gateway.keys["inference"], **{"User-Agent": agent.encode("latin-1")}) as client:
        resp = client.post("/v1/chat/completions", json={"model": MODEL, "messages": QUESTION, "max_tokens": 4})
    assert resp.status_code == 200, resp.text
    records = [r for r in gateway.records("acme") if r.request_id == resp.json()["id"]]
    assert [r.event_type for r in records] == ["accepted", "completed"]
    for record in records:
        assert record.data["client_ip"] == "127.0.0.1" and record.data["user_agent"] == _cleaned(agent)
    assert records[0].data["run_id"] == gateway.runtime.run_id and len(gateway.runtime.run_id) == 32

    client_ = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=gateway.keys["inference"], max_retries=0,
                            http_client=httpx.Client(verify=tls_ctx(gateway.ca), timeout=60))
    chunks = list(client_.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4,  # type: ignore[arg-type]
                                                  stream=True))
    streamed = [r for r in gateway.records("acme") if r.request_id == chunks[0].id]
    assert [r.event_type for r in streamed] == ["accepted", "completed"]
    assert all(r.data["user_agent"].startswith("OpenAI/Python") for r in streamed)

    with pytest.raises(openai.PermissionDeniedError) as refused:  # a refusal of the service
        client_.chat.completions.create(model="not-granted", messages=QUESTION)  # type: ignore[arg-type]
    x_request_id = refused.value.response.headers["x-request-id"]
    (rejected,) = gateway.by_x_request_id("acme", x_request_id)  # once: the refusal middleware adds none
    assert rejected.event_type == "rejected" and rejected.data["code"] == "model_not_allowed"
    assert rejected.data["client_ip"] == "127.0.0.1" and rejected.data["user_agent"].startswith("OpenAI/Python")


def _raw_request(gateway: Gateway, head: str) -> str:
    """Send a request head as it is (no body) over TLS; the whole answer."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=20) as raw, \
            tls_ctx(gateway.ca).wrap_socket(raw, server_hostname="localhost") as conn:
        conn.sendall(head.encode("latin-1"))
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer.decode("latin-1")


def test_refusals_that_nobody_else_records_are_recorded_once(gateway: Gateway) -> None:
    with gateway.http(gateway.keys["inference"], **{"User-Agent": "probe/1"}) as client:
        malformed = client.post("/v1/chat/completions", content=b"{not json",
                                headers={"Content-Type": "application/json"})
        unknown = client.get("/v1/nothing-here")
    assert malformed.status_code == 400 and unknown.status_code == 404
    (bad,) = gateway.by_x_request_id("acme", malformed.headers["x-request-id"])  # written by the error handler
    assert bad.event_type == "rejected" and bad.data["code"] == "invalid_request"
    (missing,) = gateway.by_x_request_id("acme", unknown.headers["x-request-id"])
    assert missing.event_type == "rejected" and missing.actor.startswith("key:")
    assert {k: missing.data[k] for k in ("status", "code", "method", "path", "client_ip", "user_agent")} == {
        "status": 404, "code": "not_found", "method": "GET", "path": "/v1/nothing-here", "client_ip": "127.0.0.1",
        "user_agent": "probe/1"}

    with gateway.http(gateway.keys["audit"]) as officer:
        bad_period = officer.get("/v1/audit/export", params={"since": "last tuesday"})
    assert bad_period.status_code == 400
    (period,) = gateway.by_x_request_id("acme", bad_period.headers["x-request-id"])
    assert period.data["code"] == "invalid_parameter" and "since" in period.data["reason"]

    with gateway.http(gateway.admin_key) as admin:
        nosuch = admin.get("/admin/v1/tenants/nosuch")
    assert nosuch.status_code == 404
    (admin_refused,) = gateway.by_x_request_id("_admin", nosuch.headers["x-request-id"])
    assert admin_refused.event_type == "admin.request_refused" and admin_refused.actor == "admin:admin"
    assert admin_refused.data["key_id"] == gateway.admin_key.split("_")[1]

    # refused by the edge on its Content-Length, before any key is checked: the presented key id is
    # recorded as claimed only
    key_id = gateway.keys["inference"].split("_")[1]
    answer = _raw_request(gateway, f"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nUser-Agent: big/1\r\n"
                                   f"Authorization: Bearer {gateway.keys['inference']}\r\n"
                                   f"Content-Type: application/json\r\nContent-Length: {10**7}\r\n\r\n")
    assert answer.startswith("HTTP/1.1 413")
    x_request_id = next(line.split(":", 1)[1].strip() for line in answer.split("\r\n")
                        if line.lower().startswith("x-request-id:"))
    (too_large,) = gateway.by_x_request_id("_admin", x_request_id)
    assert too_large.event_type == "admin.request_refused" and too_large.actor == "anonymous"
    assert too_large.data["code"] == "request_too_large" and too_large.data["claimed_key_id"] == key_id
    assert too_large.data["user_agent"] == "big/1" and too_large.data["client_ip"] == "127.0.0.1"


def test_exports_and_verifications_through_the_api_are_recorded(gateway: Gateway, tmp_path: Path) -> None:
    with gateway.http(gateway.keys["audit"], **{"User-Agent": "officer/2"}) as officer:
        own = officer.get("/v1/audit/export")
    assert own.status_code == 200, own.text
    (tmp_path / "own.tar").write_bytes(own.content)
    with tarfile.open(tmp_path / "own.tar") as tar:
        member = tar.extractfile("manifest.json")
        assert member is not None
        count = json.loads(member.read())["count"]
    exported = [r for r in gateway.records("_admin") if r.event_type == "admin.audit_exported"]
    assert exported[-1].actor == "key:" + gateway.keys["audit"].split("_")[1]
    assert {k: exported[-1].data[k] for k in ("stream", "count", "format", "via", "client_ip", "user_agent")} == {
        "stream": "acme", "count": count, "format": "jsonl", "via": "tenant api", "client_ip": "127.0.0.1",
        "user_agent": "officer/2"}

    with gateway.http(gateway.admin_key) as admin:
        theirs = admin.get("/admin/v1/audit/export", params={"stream": "acme", "since": "2020-01-01T00:00:00Z"})
        verified = admin.get("/admin/v1/audit/verify")
        refused = admin.get("/admin/v1/audit/export", params={"stream": "../etc"})
    assert theirs.status_code == 200 and verified.status_code == 200 and verified.json()["ok"] is True
    assert refused.status_code == 400
    by_admin = [r for r in gateway.records("_admin") if r.actor == "admin:admin"]
    kinds = [r.event_type for r in by_admin]
    export = by_admin[kinds.index("admin.audit_exported")]
    assert export.data["stream"] == "acme" and export.data["via"] == "admin api" and export.data["count"] >= count
    assert export.data["since"] == "2020-01-01T00:00:00+00:00" and export.tenant == "acme"
    verify = by_admin[kinds.index("admin.audit_verified")]
    assert verify.data["ok"] is True and verify.data["records_checked"] > 0 and verify.data["failed_streams"] == []
    assert kinds[-1] == "admin.request_refused" and by_admin[-1].data["status"] == 400


def test_a_presented_secret_is_nowhere_in_the_database(gateway: Gateway) -> None:
    store = gateway.runtime.tenants
    revoked = store.issue_key("acme", "to revoke")
    store.revoke_key(revoked.key_id)
    made_up = "sov_0123456789abcdef_" + "Q" * 43
    with gateway.http(revoked.secret, **{"User-Agent": "thief/1"}) as thief:
        assert thief.get("/v1/models").status_code == 401
    with gateway.http(made_up) as guesser:
        assert guesser.get("/v1/models").status_code == 401
    with gateway.http(gateway.keys["inference"]) as client:  # a valid key, a malformed body
        assert client.post("/v1/chat/completions", json={"model": 5}).status_code == 400
    failed = [r for r in gateway.records("_admin") if r.event_type == "admin.auth_failed"]
    mine = [r for r in failed if r.data.get("key_id") == revoked.key_id]
    assert mine and mine[-1].data["client_ip"] == "127.0.0.1" and mine[-1].data["user_agent"] == "thief/1"
    gateway.runtime.audit.checkpoint()  # everything committed
    data = gateway.runtime.config.data_dir
    stored = b"".join(p.read_bytes() for p in data.iterdir() if p.is_file() and p.name.startswith("appliance.db"))
    for secret in (revoked.secret, made_up, gateway.keys["inference"], gateway.admin_key):
        assert secret.split("_", 2)[2].encode() not in stored


def test_unauthenticated_refusals_are_bounded_with_a_summary(gateway: Gateway) -> None:
    time.sleep(WINDOW_S)
    with gateway.http(None) as anyone:
        assert anyone.get("/health").status_code == 200  # a new window (and any earlier summary written)
        before = len(gateway.records("_admin"))
        started = time.monotonic()
        answers = [anyone.get("/nowhere").status_code for _ in range(25)]
        elapsed = time.monotonic() - started
        time.sleep(WINDOW_S)
        assert anyone.get("/health").status_code == 200  # the window is over: its summary is written
    assert set(answers) == {404}
    new = gateway.records("_admin")[before:]
    written = [r for r in new if r.event_type == "admin.request_refused" and r.data["path"] == "/nowhere"]
    summaries = [r for r in new if r.event_type == "admin.request_refused_summary"]
    suppressed = sum(int(s.data["by_client"].get("127.0.0.1", 0)) for s in summaries)
    assert written and summaries
    assert len(written) + suppressed == 25
    assert len(written) <= PER_CLIENT * (2 + int(elapsed // WINDOW_S))  # bounded, whatever the machine's speed


def test_the_reconciliation_is_the_first_thing_a_run_writes(tmp_path: Path, model_dir: Path) -> None:
    root = lay_out_root(tmp_path / "root", model_dir)
    first = Runtime.open(root)  # never stopped: its marker stays, as after a crash
    try:
        policies = Path(first.config.policies_dir) / "tenants.yaml"
        doc = yaml.safe_load(policies.read_text())
        doc["default_tenant"]["rate_limit_rpm"] = 61
        policies.write_text(yaml.safe_dump(doc))
        known = len(first.audit.query("_admin"))
        second = Runtime.open(root)
    finally:
        first.audit.close()
        first.db.dispose()
    try:
        new = second.audit.query("_admin")[known:]
        assert [r.event_type for r in new] == ["admin.unclean_shutdown", "admin.policy_changed"]
        assert new[0].data["previous_run_id"] == first.run_id and new[0].data["run_id"] == second.run_id
        assert new[1].data["old_digest"] == first.policies.digest != new[1].data["new_digest"] == second.policies.digest
        assert second.audit.verify().ok
    finally:
        second.audit.close()
        second.db.dispose()
