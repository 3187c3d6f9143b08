"""Fleet inventories (roles, engine ports, models, per-node roots) and the appliance.yaml each node
gets from them: the real role template rendered with the installer's own variables, and the
certificates' names checked against the URLs the gateway is given."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml

from airgap_bundle.bundle_models import BundleModel
from installer import InventoryError, load_inventory
from installer.database import database_vars
from installer.inventory import Inventory
from installer.node_models import plan_node_models
from installer.pki import node_sans
from installer.status import PLAYBOOK_DIR

RELEASE_ROLE = PLAYBOOK_DIR / "roles" / "sovereign_release"
LABELS_A = {"region": "eu", "site": "a", "classification": "internal"}
LABELS_B = {"region": "eu", "site": "b", "classification": "internal"}
SHARED_DB = {"url": "postgresql+psycopg://sovereign@db.example:5432/sovereign"}  # gw-1 and gpu-2 are gateways


def fleet() -> Inventory:
    return Inventory.model_validate({"gateway": {"host": "0.0.0.0", "port": 8443}, "database": SHARED_DB, "nodes": [
        {"name": "gw-1", "connection": "ssh", "host": "10.0.0.10", "roles": ["gateway"], "labels": LABELS_A,
         "root": "/srv/gw"},
        {"name": "gpu-1", "connection": "ssh", "host": "10.0.0.11", "roles": ["engine"], "labels": LABELS_A,
         "models": ["Other-7B"]},
        {"name": "gpu-2", "connection": "ssh", "host": "gpu-2.dc2.example", "roles": ["engine", "gateway"],
         "engine_port": 9500, "labels": LABELS_B}]})


def render(inv: Inventory, node: str, model: str = "SmolLM2-135M-Instruct") -> dict[str, Any]:
    """appliance.yaml.j2 as the role renders it: the role's defaults (resolved the way ansible
    resolves them), the node's host vars from Inventory.to_ansible and install.py's extra vars,
    for a bundle carrying ``model`` (the default, under model/) and Other-7B (models/Other-7B)."""
    hostvars = inv.to_ansible(Path("/tmp/unused"), "/opt/sovereign")["sovereign_nodes"]["hosts"][node]
    plan = plan_node_models(inv, [BundleModel(model, "model", (f"model/{model}.safetensors",)),
                                  BundleModel("Other-7B", "models/Other-7B", ("models/Other-7B/w.safetensors",))])
    loads = plan.appliance_model(node)
    env = jinja2.Environment(trim_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters["to_json"] = json.dumps  # ansible's to_json (JSON is YAML)
    env.filters["bool"] = bool
    variables: dict[str, Any] = {
        **hostvars, "inventory_hostname": node, "sovereign_version": "0.1.0",
        "sovereign_bundle_digest": "sha256:" + "0" * 64, "sovereign_release_model_name": loads["name"],
        "sovereign_release_model_path": loads["path"],
        "sovereign_release_gateway_host": inv.gateway.host, "sovereign_release_gateway_port": inv.gateway.port,
        "sovereign_release_fleet": inv.is_fleet, "sovereign_release_fleet_nodes": inv.fleet_nodes(model),
        "sovereign_release_engine_node_host": "0.0.0.0",
    }
    variables["sovereign_release_dir"] = f"{variables['sovereign_root']}/releases/0.1.0"
    variables["sovereign_release_node_roles"] = hostvars["sovereign_node_roles"]
    variables["sovereign_release_node_models"] = hostvars["sovereign_node_models"] or [loads["name"]]
    with tempfile.TemporaryDirectory() as work:  # a password file's libpq file goes there
        roots = {n.name: inv.node_root(n, "/opt/sovereign") for n in inv.gateway_nodes}
        shared = database_vars(inv.database, inv.audit, roots, [n.name for n in inv.gateway_nodes], Path(work))
    variables["sovereign_release_database_url"] = shared["sovereign_database_urls"].get(node, "")
    variables["sovereign_release_audit"] = shared["sovereign_database_audit"]
    text = (RELEASE_ROLE / "templates" / "appliance.yaml.j2").read_text()
    return dict(yaml.safe_load(env.from_string(text).render(variables)))


def test_roles_default_to_both_and_one_node_is_no_fleet() -> None:
    inv = load_inventory(None)
    assert inv.nodes[0].roles == ["gateway", "engine"] and inv.nodes[0].engine_port == 9443
    assert not inv.is_fleet and inv.fleet_nodes("m") == []
    config = render(inv, "local", "m")
    assert config["node"]["roles"] == ["gateway", "engine"] and config["node"]["models"] == ["m"]
    assert "fleet" not in config and "engine_node" not in config


def test_fleet_inventory_gives_each_node_its_root_roles_and_the_gateways_their_engines() -> None:
    inv = fleet()
    assert inv.is_fleet
    hosts = inv.to_ansible(Path("/tmp/unused"), "/opt/sovereign")["sovereign_nodes"]["hosts"]
    assert hosts["gw-1"]["sovereign_root"] == "/srv/gw" and hosts["gpu-1"]["sovereign_root"] == "/opt/sovereign"
    assert inv.nodes[2].roles == ["gateway", "engine"]  # a stable order, whatever the file says
    gateway = render(inv, "gw-1")
    assert gateway["node"]["roles"] == ["gateway"] and "engine_node" not in gateway
    assert gateway["fleet"]["nodes"] == [
        {"name": "gpu-1", "url": "https://10.0.0.11:9443", "labels": LABELS_A,
         "models": ["Other-7B"]},
        {"name": "gpu-2", "url": "https://gpu-2.dc2.example:9500", "labels": LABELS_B,
         "models": ["SmolLM2-135M-Instruct"]}]
    engine = render(inv, "gpu-1")
    assert engine["engine_node"] == {"host": "0.0.0.0", "port": 9443} and "fleet" not in engine
    assert engine["node"]["models"] == ["Other-7B"]
    assert engine["model"] == {"name": "Other-7B", "path": "/opt/sovereign/releases/0.1.0/models/Other-7B"}
    assert render(inv, "gpu-2")["model"] == {"name": "SmolLM2-135M-Instruct",
                                             "path": "/opt/sovereign/releases/0.1.0/model"}
    assert gateway["model"]["name"] == "SmolLM2-135M-Instruct"  # the default; its files are not on gw-1
    both = render(inv, "gpu-2")  # gateway and engine on one node of a fleet: both sections
    assert both["engine_node"]["port"] == 9500 and len(both["fleet"]["nodes"]) == 2


def test_a_single_node_with_one_role_is_refused_and_gateway_only_is_a_fleet() -> None:
    with pytest.raises(ValueError, match="at least one node with the engine role"):
        Inventory.model_validate({"nodes": [{"name": "gw", "roles": ["gateway"], "labels": LABELS_A}]})
    inv = Inventory.model_validate({"nodes": [
        {"name": "gw", "roles": ["gateway"], "labels": LABELS_A},
        {"name": "e", "connection": "ssh", "host": "10.0.0.2", "roles": ["engine"], "labels": LABELS_A}]})
    assert inv.is_fleet and [n["name"] for n in inv.fleet_nodes("m")] == ["e"]


def test_every_engine_url_host_is_in_that_nodes_certificate_names() -> None:
    inv = fleet()
    for entry in inv.fleet_nodes("m"):
        node = next(n for n in inv.nodes if n.name == entry["name"])
        host = entry["url"].removeprefix("https://").rsplit(":", 1)[0]
        assert host in node_sans(node, inv), (host, node_sans(node, inv))


@pytest.mark.parametrize(("node", "message"), [
    ("{name: a, roles: [], labels: $L}", "nodes[0].roles: expected at least one role of ['gateway', 'engine'], "
                                          "found none"),
    ("{name: a, roles: [gpu], labels: $L}", "nodes[0].roles[0]: expected 'gateway' or 'engine', found 'gpu'"),
    ("{name: a, roles: [engine, engine], labels: $L}", "nodes[0].roles: expected each role once, found ['engine']"),
    ("{name: a, engine_port: 0, labels: $L}", "nodes[0].engine_port: expected greater than or equal to 1, found 0"),
    ("{name: a, models: [], labels: $L}", "nodes[0].models: expected at least one model name"),
    ("{name: a, roles: [gateway], models: [m], labels: $L}",
     "nodes[0]: expected models only on a node with the engine role, found models ['m'] on a node with roles "
     "['gateway']"),
    ("{name: a, root: srv/a, labels: $L}", "nodes[0]: expected an absolute install root other than / without '..', "
                                           "found 'srv/a'"),
    ("{name: a, root: /, labels: $L}", "nodes[0]: expected an absolute install root other than /"),
    ("{name: a, ssh_key: /k, labels: $L}", "nodes[0]: expected ssh_key only for connection ssh, found ssh_key on a "
                                           "local node"),
    ("{name: a, connection: ssh, host: h, known_hosts: kh, labels: $L}",
     "nodes[0]: expected an absolute known_hosts path on this machine, found 'kh'"),
])
def test_fleet_fields_errors_say_where_what_and_found(tmp_path: Path, node: str, message: str) -> None:
    path = tmp_path / "inventory.yaml"
    path.write_text("nodes:\n  - " + node.replace("$L", "{region: x, site: y, classification: z}") + "\n")
    with pytest.raises(InventoryError) as info:
        load_inventory(path)
    assert f"{path}: {message}" in str(info.value)
    assert info.value.exit_code == 2


def test_inventory_without_an_engine_or_gateway_or_with_a_shared_root_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "inventory.yaml"
    path.write_text("nodes:\n"
                    "  - {name: a, roles: [engine], labels: {region: x, site: y, classification: z}}\n"
                    "  - {name: b, connection: ssh, host: h, roles: [engine], labels: "
                    "{region: x, site: y, classification: z}}\n")
    with pytest.raises(InventoryError, match=r"<top level>: expected at least one node with the gateway role, "
                                             r"found roles a: \['engine'\], b: \['engine'\]"):
        load_inventory(path)
    path.write_text("nodes:\n"
                    "  - {name: a, connection: ssh, host: h, root: /srv/x, labels: "
                    "{region: x, site: y, classification: z}}\n"
                    "  - {name: b, connection: ssh, host: h, root: /srv/x/, labels: "
                    "{region: x, site: y, classification: z}}\n")
    with pytest.raises(InventoryError, match="expected each node its own install root, found b and a both at "
                                             "/srv/x on h"):
        load_inventory(path)


def test_release_archive_for_ssh_nodes_carries_exactly_the_release_files(tmp_path: Path) -> None:
    import tarfile

    from installer.transfer import needs_archive, release_archive

    stage = tmp_path / "stage"
    (stage / "model").mkdir(parents=True)
    (stage / "model" / "w.bin").write_bytes(b"\0" * 1000)
    (stage / "manifest.json").write_text("{}")
    (stage / "not-a-release-file").write_text("x")
    files = [{"src": "manifest.json", "dest": "manifest.json", "sha256": "0"},
             {"src": "model/w.bin", "dest": "model/w.bin", "sha256": "0"}]
    with tarfile.open(release_archive(stage, files, tmp_path / "r.tar")) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["manifest.json", "model/w.bin"]
        assert all(m.isreg() and m.mode == 0o444 and m.uid == 0 for m in members)
        assert tar.extractfile("model/w.bin").read() == b"\0" * 1000  # type: ignore[union-attr]
    (stage / "model" / "link").symlink_to("w.bin")
    with pytest.raises(ValueError, match="expected a regular file of the verified bundle"):
        release_archive(stage, [{"src": "model/link"}], tmp_path / "bad.tar")
    assert needs_archive(fleet()) and not needs_archive(load_inventory(None))


def test_the_node_unpacks_only_the_release_files_from_the_archive(tmp_path: Path) -> None:
    import importlib.util
    import io
    import tarfile

    spec = importlib.util.spec_from_file_location(
        "sovereign_release_files", RELEASE_ROLE / "library" / "sovereign_release_files.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def archive(name: str, *members: tarfile.TarInfo) -> Path:
        path = tmp_path / name
        with tarfile.open(path, "w") as tar:
            for info in members:
                tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)
        return path

    good = tarfile.TarInfo("model/w.bin")
    good.size = 3
    assert module.unpack(str(archive("ok.tar", good)), str(tmp_path / "ok"), {"model/w.bin"}) == 1
    assert (tmp_path / "ok" / "model" / "w.bin").read_bytes() == b"xxx"
    link = tarfile.TarInfo("model/w.bin")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    escape = tarfile.TarInfo("../outside")
    escape.size = 1
    for name, member in (("link.tar", link), ("escape.tar", escape)):
        with pytest.raises(ValueError, match="expected only the release's regular files"):
            module.unpack(str(archive(name, member)), str(tmp_path / name), {"model/w.bin"})
    assert not (tmp_path / "outside").exists()
