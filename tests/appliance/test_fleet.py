"""The fleet end to end: three real engine node processes (two in site A, one in site B) with
installer-issued mutual TLS behind one real gateway, driven by the official openai client.

A tenant pinned to site A is served only by A nodes (the audit log and the nodes' own metrics say
so), spread over both; with both A nodes down it gets 503 while B is healthy and B receives
nothing; an A node back is used again within the health interval; a node killed mid-stream gives
the client a clean error and a `failed` record naming it; draining under load loses nothing; and
no header, body field or model name can send a request to another site.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.appliance.fleet_lab import MODEL, FleetLab
from tests.appliance.support import tls_ctx

SITE_A = {"region": "eu", "site": "a", "classification": "internal"}
SITE_B = {"region": "eu", "site": "b", "classification": "internal"}
POLICY = {
    "residency": {"site-a": {"regions": ["*"], "sites": ["a"], "classifications": ["*"]},
                  "site-c": {"regions": ["*"], "sites": ["c"], "classifications": ["*"]}},
    "tenants": {"pinned": {"allowed_models": ["*"], "residency": "site-a", "rate_limit_rpm": 1000,
                           "max_tokens_per_minute": 1000000},
                "nowhere": {"allowed_models": ["*"], "residency": "site-c"}},
}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a very long story about a dragon who learns to cook, in ten chapters."}]
HEALTH_INTERVAL_S = 0.5
READ_TIMEOUT_S = 15.0


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[FleetLab]:
    lab = FleetLab(tmp_path_factory.mktemp("fleet"), model_dir)
    lab.build({"a1": SITE_A, "a2": SITE_A, "b1": SITE_B}, POLICY,
              {"health_interval_s": HEALTH_INTERVAL_S, "health_backoff_max_s": 2.0, "connect_timeout_s": 3.0,
               "read_timeout_s": READ_TIMEOUT_S})
    try:
        lab.start_all()
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="module")
def pinned(lab: FleetLab) -> str:
    return lab.tenant_key("pinned")


def _ask(client: openai.OpenAI, max_tokens: int = 8, **extra: object) -> str:
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=max_tokens, temperature=0,
                                           **extra)  # type: ignore[call-overload]
    return str(reply.id)


def _served_by(lab: FleetLab, tenant: str, request_id: str) -> str:
    done = [d for kind, rid, d in lab.records(tenant) if rid == request_id and kind == "completed"]
    assert done, f"no completed record for {request_id}"
    return str(done[0]["node"])


def _wait_until(check: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def test_node_server_refuses_a_client_without_the_installers_certificate(lab: FleetLab) -> None:
    assert lab.node_http("b1").get("/health").json()["status"] == "ok"
    with pytest.raises(httpx.HTTPError):
        lab.node_http("b1", client_cert=False).get("/health")


def test_pinned_tenant_is_served_only_in_its_site_and_spread_over_both_nodes(lab: FleetLab, pinned: str) -> None:
    b_before = lab.node_tokens("b1")
    client = lab.client(pinned)
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda _: _ask(client, max_tokens=24), range(12)))
    nodes = [_served_by(lab, "pinned", rid) for rid in ids]
    assert set(nodes) == {"a1", "a2"}, nodes
    assert lab.node_tokens("b1") == b_before
    accepted = [d for kind, _, d in lab.records("pinned") if kind == "accepted"]
    assert all(d["node_labels"]["site"] == "a" for d in accepted)  # type: ignore[index]
    assert all(set(d["routing"]["candidates"]) == {"a1", "a2"} for d in accepted)  # type: ignore[index]
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_residency_cannot_be_bypassed_by_anything_the_client_sends(lab: FleetLab, pinned: str) -> None:
    b_before = lab.node_tokens("b1")
    client = lab.client(pinned)
    headers = {"X-Node": "b1", "X-Site": "b", "X-Region": "eu", "X-Forwarded-For": "10.0.0.1",
               "X-Sovereign-Node": "b1", "Host": "b1"}
    ids = [_ask(client, extra_headers=headers), _ask(client, user="site-b")]
    # body fields naming a node, site or tenant are not read: they are refused (400 naming the field)
    for field, value in [("node", "b1"), ("site", "b"), ("labels", {"site": "b"}), ("residency", "anywhere"),
                         ("cache_salt", "x"), ("metadata", {"site": "b"}), ("tenant", "other")]:
        with pytest.raises(openai.BadRequestError) as refused:
            _ask(client, extra_body={field: value})
        assert refused.value.param == field, (field, refused.value.body)
    assert {_served_by(lab, "pinned", rid) for rid in ids} <= {"a1", "a2"}
    for model in ("b1/" + MODEL, MODEL + "@b1", "b1", MODEL + " "):
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=model, messages=QUESTION, max_tokens=4)
    assert lab.node_tokens("b1") == b_before


def test_a_tenant_whose_residency_no_node_meets_is_refused_403(lab: FleetLab) -> None:
    with pytest.raises(openai.PermissionDeniedError) as refused:
        _ask(lab.client(lab.tenant_key("nowhere")))
    assert refused.value.code == "no_compliant_node"
    assert lab.client(lab.tenant_key("nowhere")).models.list().data == []


def test_site_down_gives_503_and_never_the_other_site_then_recovers(lab: FleetLab, pinned: str) -> None:
    b_before = lab.node_tokens("b1")
    client = lab.client(pinned)
    lab.stop_node("a1")
    lab.stop_node("a2")
    # the first requests after the stop may still be retried onto the other A node; then 503
    def refused() -> bool:
        try:
            _ask(client)
        except openai.APIStatusError as exc:
            assert exc.status_code == 503, exc
            assert exc.code == "no_compliant_node_available"
            assert exc.response.headers.get("retry-after")
            return True
        return False

    _wait_until(refused, 20, "503 with both A nodes down")
    for _ in range(3):
        assert refused()
    assert lab.node_tokens("b1") == b_before  # B is healthy and received nothing
    listed = lab.appliance("nodes", "list", "--json")
    states = {n["name"]: n["state"] for n in json.loads(listed.stdout)}
    assert states == {"a1": "down", "a2": "down", "b1": "active"}, listed
    lab.start_node("a1")
    back = time.monotonic()

    def served() -> bool:
        try:
            return _served_by(lab, "pinned", _ask(client)) == "a1"
        except openai.APIStatusError:
            return False

    _wait_until(served, 10 * HEALTH_INTERVAL_S + 10, "a1 serving again after it came back")
    assert time.monotonic() - back < 10 * HEALTH_INTERVAL_S + 10
    kinds = [r for r in lab.records("_admin") if r[0] in ("admin.node_down", "admin.node_up")]
    assert {(k, d["node"]) for k, _, d in kinds} >= {("admin.node_down", "a1"), ("admin.node_down", "a2"),
                                                    ("admin.node_up", "a1")}
    lab.start_node("a2")


def test_node_killed_mid_stream_gives_a_clean_error_and_a_failed_record(lab: FleetLab, pinned: str) -> None:
    lab.wait_node("a2")
    client = lab.client(pinned)
    _wait_until(lambda: {_served_by(lab, "pinned", _ask(client)) for _ in range(4)} == {"a1", "a2"}, 30,
                "both A nodes serving")
    stream = client.chat.completions.create(model=MODEL, messages=STORY, max_tokens=400, temperature=0, stream=True)
    chunks = iter(stream)
    first = next(chunks)
    request_id = first.id
    victim = next(d["node"] for k, rid, d in lab.records("pinned") if rid == request_id and k == "accepted")
    lab.stop_node(str(victim), signal.SIGKILL)
    with pytest.raises(openai.APIError) as failed:
        for _ in chunks:
            pass
    assert "failed" in str(failed.value)
    _wait_until(lambda: any(k == "failed" and rid == request_id for k, rid, _ in lab.records("pinned")), 10,
                "failed record")
    record = next(d for k, rid, d in lab.records("pinned") if rid == request_id and k == "failed")
    assert record["node"] == victim and record["node_labels"]["site"] == "a"  # type: ignore[index]
    lab.start_node(str(victim))


def test_a_node_that_stalls_mid_stream_times_out_between_tokens(lab: FleetLab, pinned: str) -> None:
    for name in ("a1", "a2"):
        lab.wait_node(name)
    client = lab.client(pinned, timeout=120)
    stream = client.chat.completions.create(model=MODEL, messages=STORY, max_tokens=400, temperature=0, stream=True)
    chunks = iter(stream)
    request_id = next(chunks).id
    victim = str(next(d["node"] for k, rid, d in lab.records("pinned") if rid == request_id and k == "accepted"))
    proc = lab.nodes[victim].proc
    assert proc is not None
    os.killpg(proc.pid, signal.SIGSTOP)  # alive but silent: no connection error, only silence
    try:
        started = time.monotonic()
        with pytest.raises(openai.APIError, match="failed"):
            for _ in chunks:
                pass
        waited = time.monotonic() - started
        assert READ_TIMEOUT_S - 5 <= waited, waited  # it waited for the timeout, not a connection error
        _wait_until(lambda: any(k == "failed" and rid == request_id for k, rid, _ in lab.records("pinned")), 10,
                    "failed record")
        record = next(d for k, rid, d in lab.records("pinned") if rid == request_id and k == "failed")
        assert record["node"] == victim and "Timeout" in str(record["error"])
    finally:
        os.killpg(proc.pid, signal.SIGCONT)
    _wait_until(lambda: victim in {_served_by(lab, "pinned", _ask(client)) for _ in range(4)}, 30,
                f"{victim} serving again")


def test_drain_under_load_loses_nothing(lab: FleetLab, pinned: str) -> None:
    for name in ("a1", "a2"):
        lab.wait_node(name)
    client = lab.client(pinned)
    _wait_until(lambda: {_served_by(lab, "pinned", _ask(client)) for _ in range(4)} == {"a1", "a2"}, 30,
                "both A nodes serving")
    results: list[str] = []
    errors: list[BaseException] = []

    def load() -> None:
        try:
            results.append(_ask(client, max_tokens=32))
        except BaseException as exc:  # collected: the test asserts there are none
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(10)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    drained = lab.appliance("nodes", "drain", "a1", "--wait", "120", "--json")
    for t in threads:
        t.join(180)
    assert drained.returncode == 0, drained.stdout + drained.stderr
    assert json.loads(drained.stdout)["state"] == "drained"
    assert not errors, errors
    assert len(results) == 10
    after = {_served_by(lab, "pinned", _ask(client)) for _ in range(4)}
    assert after == {"a2"}
    undrained = lab.appliance("nodes", "undrain", "a1")
    assert undrained.returncode == 0, undrained.stderr
    _wait_until(lambda: "a1" in {_served_by(lab, "pinned", _ask(client)) for _ in range(4)}, 20, "a1 back")
    events = {k for k, _, _ in lab.records("_admin")}
    assert {"admin.node_draining", "admin.node_drained", "admin.node_undrained"} <= events


def test_admin_api_and_metrics_per_node(lab: FleetLab) -> None:
    created = lab.appliance("admins", "create", "fleet-ops")
    assert created.returncode == 0, created.stderr
    admin = httpx.Client(base_url=lab.url, verify=tls_ctx(lab.gateway_root / "tls" / "ca.pem"),
                         headers={"Authorization": f"Bearer {created.stdout.strip()}"}, timeout=30)
    text = admin.get("/admin/v1/metrics").text
    assert 'appliance_node_requests_total{code="completed",node="a1"}' in text
    assert 'appliance_node_state{node="b1",state="active"} 1.0' in text
    assert 'appliance_node_requests_in_flight{node="a2"}' in text
    nodes = {n["name"]: n for n in admin.get("/admin/v1/nodes").json()["data"]}
    assert nodes["b1"]["labels"]["site"] == "b" and nodes["b1"]["state"] == "active"
    bad = admin.post("/admin/v1/nodes", json={"name": "c1", "url": "http://10.0.0.1:9443", "labels": {},
                                              "models": [MODEL]})
    assert bad.status_code == 400 and "https://" in bad.json()["error"]["message"]
    drained = admin.post("/admin/v1/nodes/b1/drain")
    assert drained.status_code == 200 and drained.json()["lifecycle"] in ("draining", "drained")
    assert admin.post("/admin/v1/nodes/b1/undrain").json()["state"] == "active"
    assert admin.post("/admin/v1/nodes/nope/drain").status_code == 404
    events = [(k, d.get("node")) for k, _, d in lab.records("_admin")]
    assert ("admin.node_draining", "b1") in events and ("admin.node_undrained", "b1") in events
    actors = {r.actor for r in _admin_records(lab) if r.event_type == "admin.node_draining" and r.data["node"] == "b1"}
    assert actors == {"admin:fleet-ops"}


def _admin_records(lab: FleetLab) -> list:  # type: ignore[type-arg]
    from appliance.audit import AuditLog

    log = AuditLog(f"sqlite:///{lab.gateway_root / 'data' / 'appliance.db'}",
                   lab.gateway_root / "secrets" / "audit-signing.key")
    try:
        return log.query("_admin", None, None)
    finally:
        log.close()
