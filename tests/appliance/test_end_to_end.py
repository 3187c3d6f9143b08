"""The whole path as users meet it: installed bundle, `appliance serve` over HTTPS, the real
`openai` client with tenant keys, the admin API, and the audit log verified afterwards."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.appliance.support import BIN, VendorBundle, free_port, interrupt, run_installer, start, tls_ctx

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MODEL = "SmolLM2-135M-Instruct"


@dataclass
class Served:
    root: Path
    url: str
    ca: Path
    admin_key: str

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=tls_ctx(self.ca),
                            headers={"Authorization": f"Bearer {self.admin_key}"}, timeout=30)

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0,
                             http_client=httpx.Client(verify=tls_ctx(self.ca), timeout=120))

    def new_tenant_key(self, tenant: str, models: tuple[str, ...] = (MODEL,)) -> str:
        with self.admin() as admin:
            # the shipped policy grants no model: the tenant gets the served one
            made = admin.post("/admin/v1/tenants", json={"name": tenant, "models": list(models)})
            assert made.status_code == 201, made.text
            resp = admin.post(f"/admin/v1/tenants/{tenant}/keys", json={"label": "test"})
            assert resp.status_code == 201, resp.text
            return str(resp.json()["key"])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, vendor_bundle: VendorBundle) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("root")
    port = free_port()
    installed = run_installer(vendor_bundle, root, port)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    # the first admin's key: shown once by the installer, enrolled by the appliance when it starts
    admin_key = (root / "secrets" / "admin.key").read_text().strip()
    assert admin_key in installed.stdout.replace("\n", "").replace(" ", "").replace("│", "")
    url = f"https://localhost:{port}"
    proc = start([str(BIN / "appliance"), "serve", "--root", str(root), "--port", str(port)], url,
                 root / "tls" / "ca.pem")
    yield Served(root, url, root / "tls" / "ca.pem", admin_key)
    code, out = interrupt(proc)
    assert code == 0, out


def test_openai_client_gets_paris_over_https(served: Served) -> None:
    key = served.new_tenant_key("acme")
    reply = served.client(key).chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=32,
                                                       temperature=0)
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    assert reply.choices[0].finish_reason == "stop"


def test_streaming_gives_the_same_answer(served: Served) -> None:
    key = served.new_tenant_key("streamer")
    stream = served.client(key).chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=32, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    assert "Paris" in text and finish == "stop" and usage is not None


def test_missing_and_wrong_keys_get_401(served: Served) -> None:
    resp = httpx.post(f"{served.url}/v1/chat/completions", verify=tls_ctx(served.ca),
                      json={"model": MODEL, "messages": QUESTION})
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "missing_api_key"
    with pytest.raises(openai.AuthenticationError):
        served.client("sov_0123456789abcdef_" + "A" * 43).chat.completions.create(model=MODEL, messages=QUESTION)


def test_bad_requests_get_clear_openai_errors(served: Served) -> None:
    client = served.client(served.new_tenant_key("badreq", models=("*",)))  # any model: 404 when not served
    with pytest.raises(openai.NotFoundError, match="not served by any node"):
        client.chat.completions.create(model="gpt-4", messages=QUESTION)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=7)
    raw = httpx.post(f"{served.url}/v1/chat/completions", verify=tls_ctx(served.ca), content=b"{not json",
                     headers={"Authorization": f"Bearer {served.new_tenant_key('rawbad')}",
                              "Content-Type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"


def test_plain_http_is_refused(served: Served) -> None:
    with pytest.raises(httpx.HTTPError):
        httpx.get(served.url.replace("https", "http") + "/health", timeout=5)


def test_admin_api_needs_an_admin_key(served: Served) -> None:
    resp = httpx.get(f"{served.url}/admin/v1/tenants", verify=tls_ctx(served.ca),
                     headers={"Authorization": "Bearer not-the-token"})
    assert resp.status_code == 401
    tenant_key = served.new_tenant_key("not-an-admin")
    resp = httpx.get(f"{served.url}/admin/v1/tenants", verify=tls_ctx(served.ca),
                     headers={"Authorization": f"Bearer {tenant_key}"})
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "insufficient_scope"
    with served.admin() as admin:
        assert admin.get("/admin/v1/tenants").status_code == 200


def test_audit_records_exist_verify_and_hold_no_secrets(served: Served) -> None:
    key = served.new_tenant_key("audited")
    reply = served.client(key).chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=16,
                                                       temperature=0)
    db = f"sqlite:///{served.root / 'data' / 'appliance.db'}"
    verify = subprocess.run([str(BIN / "appliance"), "audit", "verify", "--db", db, "--key",
                             str(served.root / "secrets" / "audit-signing.key")], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    from appliance.audit import AuditLog

    log = AuditLog(db, served.root / "secrets" / "audit-signing.key")
    records = log.query("audited", None, None)
    kinds = [(r.event_type, r.request_id) for r in records]
    assert ("accepted", reply.id) in kinds and ("completed", reply.id) in kinds
    completed = next(r for r in records if r.event_type == "completed" and r.request_id == reply.id)
    data = completed.data if isinstance(completed.data, dict) else json.loads(completed.data)
    assert data["completion_tokens"] == reply.usage.completion_tokens  # type: ignore[union-attr]
    assert data["node"] and data["output_hash"].startswith("hmac-sha256:")
    secret = key.split("_", 2)[2]
    for path in (served.root / "data").iterdir():
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"key material found in {path}"
    # Another tenant's records never show up in this tenant's stream.
    assert all(r.tenant == "audited" for r in records)


def test_client_that_disconnects_mid_stream_is_audited_as_aborted(served: Served) -> None:
    import time

    key = served.new_tenant_key("leaver")
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 400, "temperature": 1.0, "seed": 1,
            "stream": True}
    with httpx.Client(verify=tls_ctx(served.ca), timeout=60) as http, http.stream(
        "POST", f"{served.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: ") and '"content": "' in line and '"content": ""' not in line:
                break  # got real output; hang up on the server
    from appliance.audit import AuditLog

    log = AuditLog(f"sqlite:///{served.root / 'data' / 'appliance.db'}",
                   served.root / "secrets" / "audit-signing.key")
    deadline = time.monotonic() + 30
    kinds: list[str] = []
    while time.monotonic() < deadline:
        kinds = [r.event_type for r in log.query("leaver", None, None)]
        if len(kinds) >= 2:
            break
        time.sleep(0.2)
    assert kinds == ["accepted", "aborted"]
    aborted = log.query("leaver", None, None)[-1].data
    assert 0 < aborted["completion_tokens"] < 400


def test_https_answer_verifies_against_the_installers_ca(served: Served) -> None:
    """The gateway serves the certificate the installer issued from ROOT/state/pki (never one it
    made itself): a client trusting only that CA, with hostname checks, gets its answer."""
    import socket
    import ssl

    from cryptography import x509

    port = int(served.url.rsplit(":", 1)[1])
    ctx = ssl.create_default_context(cafile=str(served.root / "state" / "pki" / "ca.pem"))
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    issued = x509.load_pem_x509_certificate((served.root / "tls" / "server.pem").read_bytes())
    for name in ("localhost", "127.0.0.1"):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname=name) as tls:
            served_der = tls.getpeercert(binary_form=True)
        assert served_der is not None
        assert x509.load_der_x509_certificate(served_der) == issued
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        ctx.wrap_socket(raw, server_hostname="gw.elsewhere.example")
    resp = httpx.get(f"{served.url}/health", verify=ctx, timeout=10)
    assert resp.status_code == 200 and resp.json()["status"] == "ok"
    marker = json.loads((served.root / "tls" / "issuer.json").read_text())
    assert marker["issuer"] == "sovereign-installer"
