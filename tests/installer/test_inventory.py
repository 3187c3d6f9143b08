from __future__ import annotations

from pathlib import Path

import pytest

from installer import EXIT_INPUT, InventoryError, default_inventory, load_inventory
from tests.installer.conftest import run_cli

GOOD = """
gateway: {host: 0.0.0.0, port: 9443}
database: {url: "postgresql+psycopg://sovereign@db.example:5432/sovereign"}  # two gateway nodes share it
nodes:
  - name: local
    labels: {region: eu-west, site: dc1, classification: confidential, rack: r7}
    gpus: 2
  - name: gpu-2
    connection: ssh
    host: 10.0.0.12
    user: deploy
    python: /usr/bin/python3.11
    labels: {region: eu-west, site: dc2, classification: confidential}
"""


def test_default_is_one_local_node() -> None:
    inv = default_inventory()
    assert inv.names == ["local"]
    node = inv.nodes[0]
    assert node.connection == "local"
    assert node.labels == {"region": "local", "site": "local", "classification": "internal"}
    assert load_inventory(None) == inv


def test_valid_inventory_to_ansible(tmp_path: Path) -> None:
    path = tmp_path / "inv.yaml"
    path.write_text(GOOD)
    inv = load_inventory(path)
    assert inv.gateway.port == 9443 and inv.names == ["local", "gpu-2"]
    hosts = inv.to_ansible(tmp_path / "tmp")["sovereign_nodes"]["hosts"]
    assert hosts["local"]["ansible_connection"] == "local"
    assert hosts["local"]["ansible_python_interpreter"]  # always named explicitly
    assert hosts["local"]["ansible_remote_tmp"] == str(tmp_path / "tmp")
    assert hosts["local"]["sovereign_node_labels"]["rack"] == "r7"
    assert hosts["gpu-2"] == {
        "ansible_connection": "ssh", "ansible_python_interpreter": "/usr/bin/python3.11",
        "sovereign_node_labels": {"region": "eu-west", "site": "dc2", "classification": "confidential"},
        "ansible_host": "10.0.0.12", "ansible_port": 22, "ansible_user": "deploy",
        "sovereign_service_exe": "/usr/bin/appliance",  # next to the node's python by default
        "sovereign_node_roles": ["gateway", "engine"], "sovereign_node_models": [],
        "sovereign_node_engine_port": 9443, "sovereign_node_gateway_workers": 1,
    }
    # given the installer's --root, every node gets its install root as a host var
    rooted = inv.to_ansible(tmp_path / "tmp", "/srv/app")["sovereign_nodes"]["hosts"]
    assert rooted["gpu-2"]["sovereign_root"] == rooted["local"]["sovereign_root"] == "/srv/app"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nodes:\n  - name: a\n    labels: {region: x}\n",
         "nodes[0].labels: expected labels ['region', 'site', 'classification'], found no site, classification"),
        ("nodes:\n  - name: a\n    connection: ssh\n    labels: {region: x, site: y, classification: z}\n",
         "nodes[0]: expected a host for connection ssh, found none"),
        ("nodes:\n  - {name: a, labels: {region: x, site: y, classification: z}}\n"
         "  - {name: a, connection: ssh, host: h, labels: {region: x, site: y, classification: z}}\n",
         "expected unique node names, found ['a'] more than once"),
        ("nodes:\n  - {name: a, colour: red, labels: {region: x, site: y, classification: z}}\n",
         "nodes[0].colour: expected only known fields, found unknown field 'colour'"),
        ("nodes:\n  - {name: a, gpus: many, labels: {region: x, site: y, classification: z}}\n",
         "nodes[0].gpus: expected a valid integer, found 'many'"),
        ("nodes:\n  - {name: a, connection: telnet, labels: {region: x, site: y, classification: z}}\n",
         "nodes[0].connection: expected 'local' or 'ssh', found 'telnet'"),
        ("nodes: []\n", "nodes: expected at least 1 item(s), found 0"),
        ("- a\n- b\n", "<top level>: expected a mapping with 'nodes', found list"),
        ("nodes: [\n", "expected valid YAML"),
        ("gateway: {port: 70000}\nnodes:\n  - {name: a, labels: {region: x, site: y, classification: z}}\n",
         "gateway.port: expected less than or equal to 65535, found 70000"),
    ],
)
def test_invalid_inventory(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "inventory.yaml"
    path.write_text(text)
    with pytest.raises(InventoryError) as info:
        load_inventory(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)
    assert info.value.exit_code == EXIT_INPUT


def test_missing_inventory_file(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match="expected a YAML file, found nothing at"):
        load_inventory(tmp_path / "absent.yaml")


def test_cli_bad_inventory_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "inventory.yaml"
    path.write_text("nodes:\n  - name: a\n    labels: {region: x}\n")
    proc = run_cli("preflight", "--root", str(tmp_path / "root"), "--inventory", str(path), "--json")
    assert proc.returncode == 2
    assert "nodes[0].labels" in proc.stdout
