"""Two whole gateways on one database hold one limit per tenant: real engine, real HTTPS, the official
``openai`` client, on one SQLite file and on one PostgreSQL database.

Each gateway is its own install root, ``Runtime`` (engine, pools, limiter) and HTTPS server,
sharing ``database.url`` and the installation's secrets; each serves from its own in-process engine
under one node name (the shared registry then holds one local node that both can reach). A tenant
limited to N requests per minute, driven through both at once, gets exactly N accepted in all;
every other request is refused 429 ``rate_limit_exceeded`` with the limit named and a Retry-After.
(The multi-process cases of the limiter itself are in
tests/appliance/test_shared_limits_processes.py.)

Runs once the gateway uses ``SharedRateLimiter`` (``ChatService`` takes a ``limiter``); until then
it skips, saying so.
"""

from __future__ import annotations

import inspect
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from appliance.db import open_database
from appliance.gateway.edge import EdgeLimits
from appliance.runtime import Runtime
from appliance.server import build_server
from appliance.service import ChatService
from appliance.tenancy import TenantStore
from policies import default_policy_dir
from tests.appliance.support import free_port, tls_ctx, wait_healthy

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"
RPM = 6


def _root(base: Path, name: str, model_dir: Path, db_url: str) -> Path:
    root = base / name
    release = root / "releases" / "1.0.0"
    shutil.copytree(default_policy_dir(), release / "policies")
    (release / "policies" / "tenants_site.yaml").write_text(
        f"tenants:\n  acme:\n    allowed_models: [{MODEL}]\n    rate_limit_rpm: {RPM}\n")
    (release / "appliance.yaml").write_text(yaml.safe_dump({
        "version": "1.0.0", "bundle_digest": "sha256:test", "model": {"name": MODEL, "path": str(model_dir)},
        "policies_dir": str(release / "policies"), "node": {"name": "local", "labels": {"region": "eu-test"}},
        "gateway": {"host": "127.0.0.1", "port": 8443}, "database": {"url": db_url},
    }))
    (root / "current").symlink_to(release)
    return root


@pytest.fixture(params=["sqlite", "postgresql"])
def gateways(request: pytest.FixtureRequest, tmp_path: Path, model_dir: Path
             ) -> Iterator[tuple[str, list[tuple[str, Path]]]]:
    """The database URL, and (URL, CA) of the two gateways running on it."""
    if "limiter" not in inspect.signature(ChatService.__init__).parameters:
        pytest.skip("the gateway still keeps rate limits in each process (appliance/service.py uses the in-memory "
                    "RateLimiter): wire appliance.limit_leases.SharedRateLimiter into ChatService")
    db_url = (f"sqlite:///{tmp_path / 'shared.db'}" if request.param == "sqlite"
              else str(request.getfixturevalue("postgres_db_url")))
    first = Runtime.open(_root(tmp_path, "a", model_dir, db_url))
    second_root = _root(tmp_path, "b", model_dir, db_url)
    # gateways of one installation share its secrets (the audit signing key above all)
    shutil.copytree(first.config.root / "secrets", second_root / "secrets")
    runtimes = [first, Runtime.open(second_root)]
    servers, threads, out = [], [], []
    try:
        for runtime in runtimes:
            port = free_port()
            server = build_server(runtime, "127.0.0.1", port, EdgeLimits())
            thread = threading.Thread(target=server.run, daemon=True)
            thread.start()
            servers.append(server)
            threads.append(thread)
            url, ca = f"https://localhost:{port}", runtime.config.root / "tls" / "ca.pem"
            wait_healthy(None, url, ca)
            out.append((url, ca))
        yield db_url, out
    finally:
        for server in servers:
            server.should_exit = True
        for thread in threads:
            thread.join(timeout=60)


def test_a_tenant_gets_exactly_its_requests_per_minute_across_two_gateways(
        gateways: tuple[str, list[tuple[str, Path]]]) -> None:
    db_url, served_by = gateways
    # the tenant and its key live in the shared database: one key works on both gateways
    db = open_database(db_url)
    try:
        store = TenantStore(db)
        store.create_tenant("acme", [MODEL])
        secret = store.issue_key("acme", "limits", scopes=["inference"]).secret
    finally:
        db.dispose()
    clients = [openai.OpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0,
                             http_client=httpx.Client(verify=tls_ctx(ca))) for url, ca in served_by]

    def ask(n: int) -> str:
        try:
            clients[n % 2].chat.completions.create(model=MODEL, max_tokens=1, temperature=0,
                                                   messages=[{"role": "user", "content": f"Say {n}."}])
            return "served"
        except openai.RateLimitError as refused:
            assert f"rate limit of {RPM} requests per minute reached" in refused.message
            assert refused.response.headers.get("retry-after"), refused.response.headers
            return str(refused.code)

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(ask, range(4 * RPM)))
    assert outcomes.count("served") == RPM, outcomes
    assert set(outcomes) == {"served", "rate_limit_exceeded"}, outcomes
