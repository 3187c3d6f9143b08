"""The installer provisions a fleet over real SSH (issue 13): one gateway node and two engine
nodes, each a network namespace with its own Debian sshd and its own install root, installed
from one inventory in one `sovereign-installer install` run with the bundle's wheelhouse (each
node builds its runtime with pip --no-index), the real model, installer-issued mutual TLS.

Measured on the shared 2-core test machine: the module takes about 6.5 minutes: the install
about 3 (per node, one after the other: release copied as one archive, runtime built from the
wheels, services started and health-checked), the rolling upgrade to 0.2.0 about 2 and the
rollback under 1; hence slow. A chat completion through the gateway's HTTPS API with the official
openai client is served by an engine node (the gateway-only node has no engine), and a tenant pinned
to site a is served only there, gets 503 while that site's engine is stopped (site b serving it
nothing) and is served again once it is back.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.installer.fleet import (
    ENGINE_PORT,
    GATEWAY_PORT,
    Fleet,
    fleet_bundle,
    install,
    installed_fleet,
    run_installer,
)
from tests.installer.sshhosts import ssh_unavailable

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, keys: Path, model_dir: Path, wheelhouse: Path) -> Iterator[Fleet]:
    why = ssh_unavailable()
    if why:
        pytest.skip(why)
    with installed_fleet(tmp_path_factory.mktemp("fleet"), keys, model_dir, wheelhouse) as fleet:
        yield fleet


def mtls(fleet: Fleet, *, client_cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(fleet.ca))
    if client_cert:
        cert, key = fleet.engine_client
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def test_one_run_installs_every_node_over_ssh(fleet: Fleet) -> None:
    result = fleet.install
    assert result["ok"] is True and sorted(result["nodes"]) == sorted(s.name for s in fleet.specs)
    assert result["version"] == "0.1.0"
    for spec in fleet.specs:
        root = fleet.root(spec.name)
        assert (root / "current").resolve() == root / "releases" / "0.1.0", spec.name
        assert len(list((root / "runtimes").iterdir())) == 1, spec.name  # built on the node from the wheels
        issuer = (root / "tls" / "issuer.json").read_text()
        assert f'"node": "{spec.name}"' in issuer
    # nothing was installed into the controller's root but the installer's own state
    assert not (fleet.controller_root / "current").exists()
    assert (fleet.controller_root / "state" / "pki" / "ca.key").is_file()


def test_each_node_runs_the_services_of_its_roles(fleet: Fleet) -> None:
    for name in fleet.engines:
        status = fleet.status(name)
        assert status["kinds"] == ["engine"], status
        engine = status["services"]["engine"]
        assert engine["running"] and engine["healthy"] and engine["version"] == "0.1.0", engine
        assert engine["port"] == ENGINE_PORT
        assert (fleet.root(name) / "logs" / "engine-node.log").is_file()
        assert not (fleet.root(name) / "run" / "appliance.pid").exists()  # no gateway on an engine node
    status = fleet.status(fleet.gateway)
    assert status["kinds"] == ["gateway"], status
    assert status["healthy"] and status["version"] == "0.1.0" and status["port"] == GATEWAY_PORT
    with httpx.Client(verify=ssl.create_default_context(cafile=str(fleet.ca)), timeout=30) as client:
        health = client.get(f"{fleet.gateway_url}/health").json()  # from the controller, over the bridge
    assert health["status"] == "ok" and health["version"] == "0.1.0"


def test_gateway_config_lists_both_engine_nodes(fleet: Fleet) -> None:
    gateway = fleet.config(fleet.gateway)
    assert gateway["node"]["roles"] == ["gateway"]
    assert "engine_node" not in gateway
    assert gateway["fleet"]["nodes"] == [
        {"name": name, "url": f"https://{fleet.address(name)}:{ENGINE_PORT}", "labels": fleet.spec(name).labels(),
         "models": ["SmolLM2-135M-Instruct"]} for name in fleet.engines]
    for name in fleet.engines:
        config = fleet.config(name)
        assert config["node"] == {"name": name, "labels": fleet.spec(name).labels(), "roles": ["engine"],
                                  "models": ["SmolLM2-135M-Instruct"]}
        assert config["engine_node"] == {"host": "0.0.0.0", "port": ENGINE_PORT}
        assert "fleet" not in config


def test_engine_nodes_answer_mutual_tls_and_refuse_a_client_without_certificate(fleet: Fleet) -> None:
    for name in fleet.engines:
        url = f"{fleet.engine_url(name)}/health"
        with httpx.Client(verify=mtls(fleet), timeout=30) as client:
            answer = client.get(url)
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == "ok" and answer.json()["version"] == "0.1.0"
        with (pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)),
              httpx.Client(verify=mtls(fleet, client_cert=False), timeout=30) as anonymous):
            anonymous.get(url)


def test_a_chat_completion_through_the_gateway_is_served_by_an_engine_node(fleet: Fleet) -> None:
    created = fleet.appliance(fleet.gateway, "tenants", "create", "fleet-test", "--models", MODEL)
    assert created.returncode == 0, created.stderr
    issued = fleet.appliance(fleet.gateway, "keys", "issue", "fleet-test", "--json")
    assert issued.returncode == 0, issued.stderr
    key = json.loads(issued.stdout)["key"]
    wait_for_active_nodes(fleet, fleet.engines)
    ctx = ssl.create_default_context(cafile=str(fleet.ca))
    client = openai.OpenAI(base_url=f"{fleet.gateway_url}/v1", api_key=key, max_retries=0,
                           http_client=httpx.Client(verify=ctx, timeout=180))
    reply = client.chat.completions.create(model=MODEL, max_tokens=16, temperature=0, messages=[
        {"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in str(reply.choices[0].message.content)
    served = [d.get("node") for kind, rid, d in fleet.records("fleet-test") if rid == reply.id and kind == "completed"]
    assert served and served[0] in fleet.engines, served  # an engine node, over mutual TLS; the gateway has none


PINNED_POLICY = """\
residency:
  site-a: {regions: ["*"], sites: [a], classifications: ["*"]}
tenants:
  pinned: {allowed_models: ["*"], residency: site-a, rate_limit_rpm: 1000}
"""


def node_tokens(fleet: Fleet, name: str) -> float:
    """Prompt + generated tokens the node's own metrics count (what it really served)."""
    with httpx.Client(verify=mtls(fleet), timeout=30) as client:
        text = client.get(f"{fleet.engine_url(name)}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(("vllm:prompt_tokens_total", "vllm:generation_tokens_total")))


def test_residency_holds_on_the_installed_fleet_when_its_site_goes_down_and_comes_back(fleet: Fleet) -> None:
    """The fleet behaviour of tests/appliance/test_fleet.py against this SSH install: a tenant pinned
    to site a is served by gpu-a1 only; with gpu-a1's engine stopped it gets 503 while gpu-b1 is
    healthy and serves it nothing; with gpu-a1 back it is served again."""
    applied = fleet.root(fleet.gateway) / "data" / "policies"
    applied.mkdir(parents=True, exist_ok=True)
    (applied / "site-pinned.yaml").write_text(PINNED_POLICY)  # taken up by the gateway's policy watch
    assert fleet.appliance(fleet.gateway, "tenants", "create", "pinned", "--models", MODEL).returncode == 0
    issued = fleet.appliance(fleet.gateway, "keys", "issue", "pinned", "--json")
    assert issued.returncode == 0, issued.stderr
    client = openai.OpenAI(base_url=f"{fleet.gateway_url}/v1", api_key=json.loads(issued.stdout)["key"],
                           max_retries=0, http_client=httpx.Client(
                               verify=ssl.create_default_context(cafile=str(fleet.ca)), timeout=180))
    wait_for_active_nodes(fleet, fleet.engines)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    deadline = time.monotonic() + 60
    while True:  # until the watch has taken the policy up: then only site a serves this tenant
        reply = client.chat.completions.create(model=MODEL, max_tokens=4, messages=question)  # type: ignore[arg-type]
        served = {d.get("node") for kind, rid, d in fleet.records("pinned") if rid == reply.id and kind == "completed"}
        if served == {"gpu-a1"} and any(k == "admin.policy_changed" for k, _, _ in fleet.records("_admin")):
            break
        assert time.monotonic() < deadline, "the applied policy was not taken up within 60 s"
    b_before = node_tokens(fleet, "gpu-b1")
    ids = [client.chat.completions.create(model=MODEL, max_tokens=4, messages=question).id  # type: ignore[arg-type]
           for _ in range(3)]
    assert {d.get("node") for kind, rid, d in fleet.records("pinned") if rid in ids and kind == "completed"} \
        == {"gpu-a1"}
    fleet.service("gpu-a1", "engine", "stop")
    try:
        deadline = time.monotonic() + 60
        while True:  # the gateway notices within its health interval; never another site meanwhile
            try:
                client.chat.completions.create(model=MODEL, max_tokens=4, messages=question)  # type: ignore[arg-type]
            except openai.InternalServerError as exc:
                assert exc.status_code == 503 and exc.code == "no_compliant_node_available", exc.body
                break
            except openai.APIConnectionError:
                pass
            assert time.monotonic() < deadline, "still served with site a's only engine stopped"
            time.sleep(0.5)
        assert node_tokens(fleet, "gpu-b1") == b_before  # site b is up and was given nothing
    finally:
        started = fleet.service("gpu-a1", "engine", "start")
        assert started["sovereign_service"] == "ok", started
    wait_for_active_nodes(fleet, fleet.engines)
    reply = client.chat.completions.create(model=MODEL, max_tokens=4, messages=question)  # type: ignore[arg-type]
    assert [d.get("node") for kind, rid, d in fleet.records("pinned") if rid == reply.id and kind == "completed"] \
        == ["gpu-a1"]
    assert node_tokens(fleet, "gpu-b1") == b_before


def test_a_restart_drains_each_engine_node_on_the_gateway_first(fleet: Fleet) -> None:
    done = run_installer("restart", "--root", str(fleet.controller_root), "--inventory", str(fleet.inventory),
                         "--json")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    notes = "\n".join(json.loads(done.stdout)["notes"])
    for name in fleet.engines:
        assert f"drained {name} on the gateway" in notes and f"undrained {name} on the gateway" in notes, notes
    wait_for_active_nodes(fleet, fleet.engines)


def test_rolling_upgrade_drains_each_engine_node_on_the_gateway(fleet: Fleet, keys: Path, model_dir: Path,
                                                                wheelhouse: Path, tmp_path: Path) -> None:
    bundle = fleet_bundle(tmp_path, keys, model_dir, wheelhouse, "0.2.0")
    before = len(fleet.records("_admin"))  # the restart's drains are on record already
    started = time.monotonic()
    result = install(fleet, bundle, "upgrade")
    upgrade_s = time.monotonic() - started
    assert result["version"] == "0.2.0" and result["previous"] == "0.1.0"
    notes = "\n".join(result["notes"])
    for name in fleet.engines:  # drained on the (already upgraded) gateway before its restart, undrained after
        assert f"drained {name} on the gateway" in notes, notes
        assert f"undrained {name} on the gateway" in notes, notes
        engine = fleet.status(name)["services"]["engine"]
        assert engine["healthy"] and engine["version"] == "0.2.0"
    assert "drained gw-1" not in notes  # a gateway-only node has no engine to drain
    events = [kind for kind, _, data in fleet.records("_admin")[before:] if data.get("node") in fleet.engines]
    assert events.count("admin.node_draining") == 2 and events.count("admin.node_undrained") == 2, events
    wait_for_active_nodes(fleet, fleet.engines)
    # the installer's machine keeps the fleet's release record (no node installs into its root)
    status = run_installer("status", "--root", str(fleet.controller_root), "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["current"] == "0.2.0", status.stdout[-2000:]

    started = time.monotonic()
    back = run_installer("rollback", "--root", str(fleet.controller_root), "--inventory", str(fleet.inventory),
                         "--json")
    rollback_s = time.monotonic() - started
    assert back.returncode == 0, back.stdout[-4000:] + back.stderr[-4000:]
    assert json.loads(back.stdout)["version"] == "0.1.0"
    for spec in fleet.specs:
        assert fleet.config(spec.name)["version"] == "0.1.0", spec.name
    assert fleet.status(fleet.engines[0])["services"]["engine"]["version"] == "0.1.0"
    print(f"upgrade of {len(fleet.specs)} nodes: {upgrade_s:.0f} s, rollback: {rollback_s:.0f} s")


def wait_for_active_nodes(fleet: Fleet, names: list[str], timeout_s: float = 120) -> None:
    """Until the gateway's registry has every named node active and up (its health probe passed)."""
    deadline = time.monotonic() + timeout_s
    listed: list[dict[str, str]] = []
    while time.monotonic() < deadline:
        proc = fleet.appliance(fleet.gateway, "nodes", "list", "--json")
        if proc.returncode == 0:
            listed = json.loads(proc.stdout)
            state = {n["name"]: (n["state"], n["health"]) for n in listed}
            if all(state.get(name) == ("active", "up") for name in names):
                return
        time.sleep(1)
    raise AssertionError(f"nodes {names} not active on the gateway within {timeout_s:.0f} s: {listed}")
