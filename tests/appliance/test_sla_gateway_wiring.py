from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from appliance.db import open_database
from appliance.tenancy import TenantStore
from tests.appliance.fleet_lab import MODEL, FleetLab
from tests.appliance.support import tls_ctx

Q = [{"role": "user", "content": "Say hello."}]


@pytest.fixture()
def lab(tmp_path: Path, model_dir: Path) -> Iterator[FleetLab]:
    lab = FleetLab(tmp_path, model_dir)
    lab.build({"n1": {"region": "eu", "site": "a", "classification": "internal"}},
              {"tenants": {"busy": {"allowed_models": ["*"], "rate_limit_rpm": 100000, "sla_class": "interactive"},
                           "tiny": {"allowed_models": ["*"], "rate_limit_rpm": 1}}})
    node = lab.nodes["n1"]
    node.proc = subprocess.Popen(  # type: ignore[assignment]
        [sys.executable, "-m", "tests.appliance.standin_node", "--root", str(node.root), "--model-dir",
         str(model_dir), "--port", str(node.port), "--tokens", "8", "--delay-ms", "2"], start_new_session=True)
    try:
        lab.wait_node("n1", 60)
        lab.start_gateway()
        yield lab
    finally:
        lab.close()
        if node.proc is not None and node.proc.poll() is None:
            os.killpg(node.proc.pid, signal.SIGKILL)


def test_wiring(lab: FleetLab) -> None:
    import appliance.service as s
    print("service from", s.__file__)
    busy, tiny = lab.tenant_key("busy"), lab.tenant_key("tiny")
    store = TenantStore(open_database(f"sqlite:///{lab.gateway_root / 'data' / 'appliance.db'}"))
    admin = {"Authorization": f"Bearer {store.admins.create_admin('ops', 'test').secret}"}
    client = lab.client(busy, timeout=60)
    for _ in range(3):
        assert client.chat.completions.create(model=MODEL, messages=Q, max_tokens=8).choices
    tc = lab.client(tiny, timeout=60)
    tc.chat.completions.create(model=MODEL, messages=Q, max_tokens=4)
    with pytest.raises(openai.RateLimitError):
        tc.chat.completions.create(model=MODEL, messages=Q, max_tokens=4)
    http = httpx.Client(base_url=lab.url, verify=tls_ctx(lab.gateway_root / "tls" / "ca.pem"), timeout=60)
    text = http.get("/admin/v1/metrics", headers=admin).text
    assert 'appliance_sla_slo_met_total{sla_class="interactive",tenant="busy"} 3.0' in text
    assert 'code="rate_limit_exceeded"' in text
    assert "appliance_node_requests_waiting{node=\"n1\"}" in text
