"""Policy enforcement in the gateway with the real engine, real SQLite and real policy files:
every refusal is a clear OpenAI-style error and an audited `rejected` record."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from appliance.gateway import create_app
from appliance.runtime import Runtime
from policies import default_policy_dir

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]

SITE_POLICY = {
    "residency": {"eu-only": {"regions": ["eu-west"], "sites": ["*"], "classifications": ["*"]}},
    "tenants": {
        "other-models": {"allowed_models": ["llama-70b"]},
        "eu-bank": {"residency": "eu-only"},
        "tight": {"rate_limit_rpm": 1, "max_tokens_per_request": 8},
    },
}


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Runtime]:
    """An install root laid out as the installer leaves it, with a site policy added."""
    rt = Runtime.open(_lay_out_root(tmp_path_factory.mktemp("root"), model_dir))
    # The shipped policy grants no model; each tenant is granted the served one except
    # "other-models", whose site policy allows only another model.
    for tenant in ("acme", "other-models", "eu-bank", "tight"):
        rt.tenants.create_tenant(tenant, [] if tenant == "other-models" else [MODEL])
    yield rt


def _lay_out_root(root: Path, model_dir: Path) -> Path:
    release = root / "releases" / "1.0.0"
    policies = release / "policies"
    shutil.copytree(default_policy_dir(), policies)
    (policies / "site.yaml").write_text(yaml.safe_dump(SITE_POLICY))
    (release / "appliance.yaml").write_text(yaml.safe_dump({
        "version": "1.0.0", "bundle_digest": "sha256:test",
        "model": {"name": MODEL, "path": str(model_dir)}, "policies_dir": str(policies),
        "node": {"name": "node-a", "labels": {"region": "us-east", "site": "dc1", "classification": "internal"}},
        "gateway": {"host": "127.0.0.1", "port": 8443},
    }))
    (root / "current").symlink_to(release)
    return root


@pytest.fixture(scope="module")
def client(runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(runtime)) as c:
        yield c


def _key(runtime: Runtime, tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {runtime.tenants.issue_key(tenant).secret}"}


def _last_rejection(runtime: Runtime, tenant: str) -> dict[str, object]:
    records = [r for r in runtime.audit.query(tenant, None, None) if r.event_type == "rejected"]
    assert records, f"no rejected record for {tenant}"
    return dict(records[-1].data)


def test_allowed_tenant_is_served(client: TestClient, runtime: Runtime) -> None:
    resp = client.post("/v1/chat/completions", headers=_key(runtime, "acme"),
                       json={"model": MODEL, "messages": QUESTION, "max_tokens": 24, "temperature": 0})
    assert resp.status_code == 200, resp.text
    assert "Paris" in resp.json()["choices"][0]["message"]["content"]


def test_model_not_allowed_for_tenant(client: TestClient, runtime: Runtime) -> None:
    resp = client.post("/v1/chat/completions", headers=_key(runtime, "other-models"),
                       json={"model": MODEL, "messages": QUESTION})
    assert resp.status_code == 403
    assert resp.json()["error"]["code"] == "model_not_allowed"
    assert _last_rejection(runtime, "other-models")["code"] == "model_not_allowed"
    models = client.get("/v1/models", headers=_key(runtime, "other-models")).json()
    assert models["data"] == []


def test_residency_fails_closed_when_no_node_complies(client: TestClient, runtime: Runtime) -> None:
    resp = client.post("/v1/chat/completions", headers=_key(runtime, "eu-bank"),
                       json={"model": MODEL, "messages": QUESTION})
    assert resp.status_code == 403
    assert resp.json()["error"]["code"] == "no_compliant_node"
    assert _last_rejection(runtime, "eu-bank")["code"] == "no_compliant_node"
    # Nothing was generated for it: no accepted record exists.
    assert all(r.event_type == "rejected" for r in runtime.audit.query("eu-bank", None, None))


def test_max_tokens_and_rate_limits(client: TestClient, runtime: Runtime) -> None:
    headers = _key(runtime, "tight")
    too_many = client.post("/v1/chat/completions", headers=headers,
                           json={"model": MODEL, "messages": QUESTION, "max_tokens": 100})
    assert too_many.status_code == 400 and too_many.json()["error"]["code"] == "max_tokens_exceeded"
    first = client.post("/v1/chat/completions", headers=headers,
                        json={"model": MODEL, "messages": QUESTION, "max_tokens": 4, "temperature": 0})
    assert first.status_code == 200, first.text
    second = client.post("/v1/chat/completions", headers=headers,
                         json={"model": MODEL, "messages": QUESTION, "max_tokens": 4})
    assert second.status_code == 429
    assert second.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(second.headers["Retry-After"]) >= 1


def test_tenants_get_different_cache_salts(runtime: Runtime) -> None:
    salts = {runtime.service.cache_salt(t) for t in ("acme", "eu-bank", "tight")}
    assert len(salts) == 3
    assert all("acme" not in s for s in salts)


def test_audit_chain_verifies_after_mixed_traffic(client: TestClient, runtime: Runtime) -> None:
    client.post("/v1/chat/completions", headers=_key(runtime, "acme"),
                json={"model": "nope", "messages": QUESTION})
    assert runtime.audit.verify().ok


def test_stop_leaves_every_record_in_the_database_file(tmp_path: Path, model_dir: Path) -> None:
    """After a clean stop no write-ahead log is left beside the database: a backup of
    data/appliance.db alone has every record (SQLite merges the WAL when the last connection closes)."""
    rt = Runtime.open(_lay_out_root(tmp_path / "root", model_dir))
    rt.tenants.create_tenant("acme", [MODEL])
    with TestClient(create_app(rt)) as c:
        assert c.post("/v1/chat/completions", headers=_key(rt, "acme"),
                      json={"model": MODEL, "messages": QUESTION, "max_tokens": 2}).status_code == 200
    db_file = Path(rt.config.db_url.removeprefix("sqlite:///"))
    assert db_file.is_file()
    assert not db_file.with_name(db_file.name + "-wal").exists()
    copy = tmp_path / "backup.db"
    shutil.copy(db_file, copy)  # the database file alone, as a naive backup takes it
    with sqlite3.connect(copy) as conn:
        types = [row[0] for row in conn.execute("SELECT event_type FROM audit_events")]
    assert "completed" in types and "admin.appliance_stopped" in types
