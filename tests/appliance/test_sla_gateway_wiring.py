from __future__ import annotations

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
    try:
        lab.start_standin("n1", tokens=8, delay_ms=2)
        lab.start_gateway()
        yield lab
    finally:
        lab.close()


def test_every_request_and_refusal_reaches_the_sla_metrics_and_the_nodes_are_watched(lab: FleetLab) -> None:
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
