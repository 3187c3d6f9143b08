"""Nothing blocks the event loop: a gateway under a mixed load (streams, plain completions, usage,
models, admin routes, refusals) runs no database statement from its event loop's thread, checked
by the loop guard (appliance/loopguard.py) that counts and logs every one. And the guard itself is
shown to catch a statement run on a loop."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import sqlalchemy as sa

from appliance.db import open_database
from appliance.loopguard import LoopGuard
from appliance.tenancy import TenantStore
from tests.appliance.fleet_lab import MODEL, FleetLab
from tests.appliance.support import tls_ctx

QUESTION = [{"role": "user", "content": "Say hello."}]


@pytest.fixture()
def lab(tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FleetLab]:
    monkeypatch.setenv("SOVEREIGN_LOOP_GUARD", "1")
    lab = FleetLab(tmp_path, model_dir)
    lab.build({"n1": {"region": "eu", "site": "a", "classification": "internal"}},
              {"tenants": {"busy": {"allowed_models": ["*"], "rate_limit_rpm": 100000,
                                    "max_tokens_per_day": 10_000_000},
                           "tiny": {"allowed_models": ["*"], "rate_limit_rpm": 2}}})
    try:
        lab.start_standin("n1", tokens=8, delay_ms=2)
        lab.start_gateway()
        yield lab
    finally:
        lab.close()


def test_a_mixed_load_runs_no_database_call_on_the_event_loop(lab: FleetLab) -> None:
    busy, tiny = lab.tenant_key("busy"), lab.tenant_key("tiny")
    store = TenantStore(open_database(f"sqlite:///{lab.gateway_root / 'data' / 'appliance.db'}"))
    admin = {"Authorization": f"Bearer {store.admins.create_admin('ops', 'test').secret}"}
    client = lab.client(busy, timeout=60)
    http = httpx.Client(base_url=lab.url, verify=tls_ctx(lab.gateway_root / "tls" / "ca.pem"), timeout=60)

    def work(i: int) -> None:
        kind = i % 6
        if kind == 0:
            for _ in client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, stream=True):
                pass
        elif kind == 1:
            assert client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8).choices
        elif kind == 2:
            assert client.completions.create(model=MODEL, prompt="Hello", max_tokens=4).choices
        elif kind == 3:
            assert http.get("/v1/usage", headers={"Authorization": f"Bearer {busy}"}).status_code == 200
            assert [m.id for m in client.models.list()] == [MODEL]
        elif kind == 4:  # refusals: an unknown model, a bad key, a tenant over its rate
            with pytest.raises(openai.NotFoundError):
                client.chat.completions.create(model="nope", messages=QUESTION, max_tokens=4)
            assert http.get("/v1/models", headers={"Authorization": "Bearer sk-wrong"}).status_code == 401
            http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {tiny}"},
                      json={"model": MODEL, "messages": QUESTION, "max_tokens": 4})
        elif i % 12 == 5:  # admin routes (database reads in worker threads)
            assert http.get("/admin/v1/tenants", headers=admin).status_code == 200
            assert http.get("/admin/v1/keys", headers=admin).status_code == 200
        else:
            assert http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {busy}"},
                             content=b"{not json").status_code == 400

    with ThreadPoolExecutor(12) as pool:
        list(pool.map(work, range(120)))
    metrics = http.get("/admin/v1/metrics", headers=admin)
    log = (lab.gateway_root / "gateway.log").read_text()
    assert "loop guard armed" in log
    on_loop = [line for line in log.splitlines() if "database call on the event loop" in line]
    assert not on_loop, "\n".join(log.splitlines()[-80:])
    assert metrics.status_code == 200 and "appliance_loop_db_calls_total 0.0" in metrics.text


def test_the_guard_catches_a_statement_run_on_the_loop(tmp_path: Path) -> None:
    engine = open_database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    caught: list[int] = []
    guard = LoopGuard([engine], lambda: caught.append(1))

    def query() -> None:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    async def main() -> None:
        guard.arm(asyncio.get_running_loop())
        await asyncio.to_thread(query)  # in a worker thread: fine
        assert guard.violations == 0
        query()  # on the loop: caught
        guard.disarm()
        query()  # not serving any more: not counted

    asyncio.run(main())
    guard.close()
    assert guard.violations == 1 and caught == [1]
