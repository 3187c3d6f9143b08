"""A whole gateway on PostgreSQL: ``database.url`` in appliance.yaml, the real engine, real HTTPS,
the official ``openai`` client; tenants, keys, usage and the audit log all in the PostgreSQL database.

Runs once ``appliance.yaml`` has a ``database.url`` setting (``ApplianceConfig.database_url``);
until then it skips, saying so. Skips without a PostgreSQL server (tests/pg.py).
"""

from __future__ import annotations

import dataclasses
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import sqlalchemy as sa
import yaml

from appliance.audit import AuditLog
from appliance.config import ApplianceConfig
from appliance.gateway.edge import EdgeLimits
from appliance.runtime import Runtime
from appliance.server import build_server
from policies import default_policy_dir
from tests.appliance.support import free_port, tls_ctx, wait_healthy
from tests.pg import fresh_database

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def pg_gateway(tmp_path_factory: pytest.TempPathFactory, model_dir: Path,
               postgres_url: str) -> Iterator[tuple[Path, str, str, str]]:
    """(install root, gateway URL, admin key, database URL) of a running gateway on PostgreSQL."""
    if "database_url" not in {f.name for f in dataclasses.fields(ApplianceConfig)}:
        pytest.skip("appliance.yaml has no database.url setting yet (appliance/config.py): "
                    "an installed appliance always uses its SQLite file")
    with fresh_database(postgres_url) as db_url:
        root = tmp_path_factory.mktemp("root")
        release = root / "releases" / "1.0.0"
        shutil.copytree(default_policy_dir(), release / "policies")
        (release / "appliance.yaml").write_text(yaml.safe_dump({
            "version": "1.0.0", "bundle_digest": "sha256:test", "model": {"name": MODEL, "path": str(model_dir)},
            "policies_dir": str(release / "policies"), "node": {"name": "node-a", "labels": {"region": "eu-test"}},
            "gateway": {"host": "127.0.0.1", "port": 8443}, "database": {"url": db_url},
        }))
        (root / "current").symlink_to(release)
        # the first admin, as a release before named admins left it: the runtime makes it admin.key
        (root / "secrets").mkdir(mode=0o700)
        (root / "secrets" / "admin.token").write_text("shared-token-of-the-old-release\n")
        (root / "secrets" / "admin.token").chmod(0o600)
        runtime = Runtime.open(root)
        port = free_port()
        server = build_server(runtime, "127.0.0.1", port, EdgeLimits())
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        url, ca = f"https://localhost:{port}", root / "tls" / "ca.pem"
        wait_healthy(None, url, ca)
        try:
            yield root, url, (root / "secrets" / "admin.key").read_text().strip(), db_url
        finally:
            server.should_exit = True
            thread.join(timeout=60)


def test_a_chat_completion_is_served_and_audited_in_postgres(pg_gateway: tuple[Path, str, str, str]) -> None:
    root, url, admin_key, db_url = pg_gateway
    ca = root / "tls" / "ca.pem"
    with httpx.Client(base_url=url, verify=tls_ctx(ca), headers={"Authorization": f"Bearer {admin_key}"}) as admin:
        assert admin.post("/admin/v1/tenants", json={"name": "acme", "models": [MODEL]}).status_code == 201
        made = admin.post("/admin/v1/tenants/acme/keys", json={"label": "pg", "scopes": ["inference"]})
        assert made.status_code == 201, made.text
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=made.json()["key"],
                           http_client=httpx.Client(verify=tls_ctx(ca)))
    reply = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert reply.choices[0].message.content

    assert not (root / "data" / "appliance.db").exists(), "a SQLite database was made although database.url is set"
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            tenants = conn.execute(sa.text("SELECT name FROM tenants")).scalars().all()
    finally:
        engine.dispose()
    assert "acme" in tenants
    with AuditLog(db_url, root / "secrets" / "audit-signing.key", create=False, checkpoint_every=None) as log:
        events = [r.event_type for r in log.query("acme")]
        assert "accepted" in events and "completed" in events, events
        report = log.verify()
        assert report.ok, report.to_dict()
