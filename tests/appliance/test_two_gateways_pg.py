"""Two gateway processes on one real PostgreSQL (issue 17's test): a key revoked through one is
refused by the other at once; one gateway killed with kill -9 under load loses no audit record of
a request its client saw complete, and the other keeps serving; a tenant limited to N requests a
minute gets exactly N accepted across both.

Real processes (``appliance serve`` twice, on two install roots sharing ``database.url``), real
HTTPS, the official ``openai`` client, a stand-in engine node (tests/appliance/standin_node.py:
the real node server and tokenizer; each stream is 24 tokens 20 ms apart, so streams are in
flight when the gateway dies).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import sqlalchemy as sa

from tests.appliance.fleet_lab import MODEL
from tests.appliance.gateways_lab import GatewaysLab, admin_key, ask

LIMITED_RPM = 5
TENANTS = {"acme": {"rate_limit_rpm": 100_000, "max_tokens_per_minute": 10_000_000},
           "limited": {"rate_limit_rpm": LIMITED_RPM, "max_tokens_per_minute": 10_000_000}}
STREAMS = 6  # concurrent streaming clients on the gateway that is killed


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, model_dir: Path, postgres_url: str) -> Iterator[GatewaysLab]:
    from tests.pg import fresh_database

    with fresh_database(postgres_url) as db_url:
        lab = GatewaysLab(tmp_path_factory.mktemp("two-gateways"), model_dir, db_url)
        lab.build(TENANTS)
        try:
            lab.start_node(tokens=24, delay_ms=20)
            lab.start_gateway(0)
            lab.start_gateway(1)
            yield lab
        finally:
            lab.close()


@pytest.fixture(scope="module")
def boss(lab: GatewaysLab) -> str:
    key = admin_key(lab.db_url)
    with lab.admin(0, key) as admin:
        for tenant in TENANTS:
            assert admin.post("/admin/v1/tenants", json={"name": tenant}).status_code == 201
    return key


def _key(lab: GatewaysLab, boss: str, tenant: str) -> tuple[str, str]:
    with lab.admin(0, boss) as admin:
        made = admin.post(f"/admin/v1/tenants/{tenant}/keys", json={"label": "t"})
        assert made.status_code == 201, made.text
    return made.json()["key"], made.json()["key_id"]


def test_a_key_revoked_through_one_gateway_is_refused_by_the_other_at_once(lab: GatewaysLab, boss: str) -> None:
    key, key_id = _key(lab, boss, "acme")
    for _ in range(3):
        ask(lab.client(1, key))  # cached in gateway 2
    with lab.admin(0, boss) as admin:
        assert admin.delete(f"/admin/v1/keys/{key_id}").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        ask(lab.client(1, key))


def _stream_until(lab: GatewaysLab, gateway: int, key: str, stop: threading.Event, seen: list[str],
                  errors: list[str]) -> None:
    """Stream chat completions until ``stop``; ``seen``: ids of those the client saw complete (the
    chunk that carries the finish_reason arrived, even if the stream was cut right after it);
    ``errors``: what ended the others. The gateway makes the ``completed`` record durable before it
    sends that chunk (appliance/service.py ``run``)."""
    client = lab.client(gateway, key, timeout=30)
    while not stop.is_set():
        try:
            stream = client.chat.completions.create(model=MODEL, max_tokens=24, stream=True,
                                                    messages=[{"role": "user", "content": "Tell a story."}])
            for chunk in stream:
                if chunk.choices and chunk.choices[0].finish_reason:
                    seen.append(chunk.id)  # the client has the end of the answer
        except (openai.APIError, httpx.HTTPError, OSError) as exc:
            errors.append(type(exc).__name__)
            if gateway == 1:
                time.sleep(0.2)


def _completed_ids(db_url: str) -> set[str]:
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return set(conn.execute(sa.text("SELECT request_id FROM audit_events WHERE event_type = 'completed'"))
                       .scalars().all())
    finally:
        engine.dispose()


def test_a_gateway_killed_under_load_loses_no_record_of_a_request_its_client_saw_complete(
        lab: GatewaysLab, boss: str) -> None:
    key, _ = _key(lab, boss, "acme")
    stop = threading.Event()
    seen: dict[int, list[str]] = {0: [], 1: []}
    errors: dict[int, list[str]] = {0: [], 1: []}
    threads = [threading.Thread(target=_stream_until, args=(lab, gw, key, stop, seen[gw], errors[gw]), daemon=True)
               for gw in [1] * STREAMS + [0] * 2]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while len(seen[1]) < 2 * STREAMS and time.monotonic() < deadline:
        time.sleep(0.05)
    victim = lab.gateways[1].proc
    assert victim is not None
    os.killpg(victim.pid, signal.SIGKILL)  # mid-stream: streams of 0.5 s each are in flight
    victim.wait(timeout=30)
    time.sleep(1.5)  # gateway 1 goes on serving meanwhile
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    assert len(seen[1]) >= 2 * STREAMS, (seen, errors)
    assert errors[1], "no stream of the killed gateway was cut: the kill did not land under load"

    completed = _completed_ids(lab.db_url)
    lost = [rid for rid in seen[1] + seen[0] if rid not in completed]
    assert not lost, f"{len(lost)} requests the client saw complete have no completed record: {lost[:5]}"
    # the other gateway keeps serving, on the same database, after the kill
    before = len(seen[0])
    assert before > 0 and not errors[0], errors[0]
    assert ask(lab.client(0, key))
    verified = lab.appliance("audit", "verify", "--db", lab.db_url, "--key",
                             str(lab.gateways[0].root / "secrets" / "audit-signing.key"), "--json")
    assert verified.returncode == 0, verified.stdout[-2000:] + verified.stderr[-2000:]
    assert json.loads(verified.stdout)["ok"] is True
    lab.start_gateway(1)  # back (it waits for health) for the tests after this one


def test_a_tenant_limited_to_n_requests_a_minute_gets_exactly_n_across_both_gateways(
        lab: GatewaysLab, boss: str) -> None:
    key, _ = _key(lab, boss, "limited")
    accepted, refused = 0, 0
    for i in range(3 * LIMITED_RPM):
        try:
            ask(lab.client(i % 2, key))
            accepted += 1
        except openai.RateLimitError:
            refused += 1
    assert (accepted, refused) == (LIMITED_RPM, 2 * LIMITED_RPM)
