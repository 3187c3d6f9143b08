"""The installer provisions a fleet over real SSH (issue 13): one gateway node and two engine
nodes, each a network namespace with its own Debian sshd and its own install root, installed
from one inventory in one `sovereign-installer install` run with the bundle's wheelhouse (each
node builds its runtime with pip --no-index), the real model, installer-issued mutual TLS.

Measured on the 2-core test machine: about 3-4 minutes (three runtime builds and three model
loads dominate), hence slow.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.installer.fleet import ENGINE_PORT, GATEWAY_PORT, Fleet, installed_fleet
from tests.installer.sshhosts import ssh_unavailable

pytestmark = pytest.mark.slow


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
