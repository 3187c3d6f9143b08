"""Refusals cost: the review's flood of 300 requests with a 30 KB model name in 3 s got 300 audited
404s and grew the audit database by 15.9 MB. Over real HTTPS against a real gateway with a budget of
20 refusals a minute, each source is cut off after its budget with a cheap 429, the audit store
barely grows, and other clients and keys are not affected."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.appliance.edge_support import MODEL, EdgeServer, edge_server

pytestmark = pytest.mark.slow
BUDGET = 20
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[EdgeServer]:
    with edge_server(tmp_path_factory.mktemp("edge-refusals"), model_dir, {"refusals_per_minute": BUDGET}) as s:
        yield s


def _data_bytes(server: EdgeServer) -> int:
    return sum(p.stat().st_size for p in (server.root / "data").glob("appliance.db*"))


def _flood(http: httpx.Client, headers: dict[str, str], body: bytes, count: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    for _ in range(count):
        resp = http.post("/v1/chat/completions", content=body, headers={**headers, "Content-Type": "application/json"})
        assert resp.headers.get("x-request-id")
        seen[f"{resp.status_code} {resp.json()['error']['code']}"] += 1
        if resp.status_code == 429:
            assert int(resp.headers["Retry-After"]) >= 1
    return seen


def test_flood_of_long_model_names_is_cut_off_cheaply(server: EdgeServer) -> None:
    before = _data_bytes(server)
    body = json.dumps({"model": "m" * 30_000, "messages": QUESTION}).encode()
    started = time.monotonic()
    with server.http("127.0.4.1") as http:
        seen = _flood(http, server.auth("edge-attacker"), body, 300)
    elapsed = time.monotonic() - started
    assert seen["429 refusal_budget_exceeded"] >= 300 - BUDGET - 2, seen
    assert sum(n for k, n in seen.items() if not k.startswith("429")) <= BUDGET + 2, seen
    assert elapsed < 120
    # At most one small record per admitted refusal, not 15.9 MB for 300.
    assert _data_bytes(server) - before < 1024 * 1024, (before, _data_bytes(server))


def test_model_not_served_is_refused_with_a_truncated_echo(server: EdgeServer) -> None:
    body = json.dumps({"model": "x" * 200, "messages": QUESTION, "max_tokens": 1}).encode()
    with server.http("127.0.4.2") as http:
        resp = http.post("/v1/chat/completions", content=body,
                         headers={**server.auth("edge-victim"), "Content-Type": "application/json"})
    assert resp.status_code in (403, 404), resp.text
    assert "x" * 65 not in resp.json()["error"]["message"], resp.text


def test_a_key_that_floods_is_blocked_from_any_address_but_not_others(server: EdgeServer) -> None:
    bad = json.dumps({"model": MODEL, "messages": QUESTION, "max_tokens": "10"}).encode()
    key = server.auth("edge-attacker")
    # Spread over many addresses: each stays under its own budget, the key does not.
    for i in range(BUDGET + 2):
        with server.http(f"127.0.5.{10 + i}") as http:
            http.post("/v1/chat/completions", content=bad, headers={**key, "Content-Type": "application/json"})
    with server.http("127.0.5.200") as http:
        resp = http.get("/v1/models", headers=key)
        assert resp.status_code == 429 and resp.json()["error"]["code"] == "refusal_budget_exceeded", resp.text
        assert http.get("/v1/models", headers=server.auth("edge-victim")).status_code == 200


def test_forged_tokens_cannot_spend_another_keys_budget(server: EdgeServer) -> None:
    victim_key = server.keys["edge-victim"]
    key_id = victim_key.split("_")[1]
    forged = {"Authorization": f"Bearer sov_{key_id}_{'A' * 43}"}
    with server.http("127.0.6.1") as http:
        seen = Counter(http.get("/v1/models", headers=forged).status_code for _ in range(BUDGET + 10))
    assert seen[401] <= BUDGET + 1 and seen[429] >= 9, seen  # the forging address is cut off
    client = server.openai("edge-victim", "127.0.6.2")
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4)  # type: ignore[arg-type]
    assert reply.choices[0].message.content is not None


def test_other_clients_are_served_while_one_is_blocked(server: EdgeServer) -> None:
    with server.http("127.0.4.50") as http:
        for _ in range(BUDGET):
            http.get("/no/such/route")  # 404s cost too
        blocked = http.get("/health")
        assert blocked.status_code == 429 and blocked.headers.get("connection") == "close"
    with server.http("127.0.4.99") as http:
        assert http.get("/health").status_code == 200
