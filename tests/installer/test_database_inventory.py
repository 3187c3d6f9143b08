"""The inventory's database:, audit: and gateway_workers (installer/database.py): every mistake a
clear error (place, expected, found), the password never in a URL, a variable or a message, and
the appliance.yaml each node gets from the real role template."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import yaml

from installer import InventoryError, load_inventory
from installer.database import database_vars
from tests.installer.test_fleet_config import render

LABELS = "{region: eu, site: a, classification: internal}"
URL = "postgresql+psycopg://sovereign@db.example:5432/sovereign"
PASSWORD = "s3cret:pw\\with-escapes"


def nodes(gateways: int = 2, workers: str = "") -> str:
    text = "nodes:\n"
    for i in range(1, gateways + 1):
        text += (f"  - {{name: gw-{i}, connection: ssh, host: 10.0.0.{i}, roles: [gateway], "
                 f"labels: {LABELS}{workers}}}\n")
    return text + f"  - {{name: gpu-1, connection: ssh, host: 10.0.0.9, roles: [engine], labels: {LABELS}}}\n"


def write(tmp: Path, text: str) -> Path:
    (tmp / "ca.pem").write_text("CA\n")
    (tmp / "pw").write_text(PASSWORD + "\nignored second line\n")
    path = tmp / "inventory.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("section", "message"), [
    ("", "<top level>: expected database: (a PostgreSQL URL shared by the gateway nodes) with more than one gateway "
         "node: each would keep its own SQLite file and tenants, keys and limits would not be shared, found no "
         "database for gateway nodes ['gw-1', 'gw-2']"),
    ("database: {url: 'postgresql+psycopg://sovereign:hunter2@db.example/sovereign'}",
     "database.url: expected no password in database.url (it would be written into appliance.yaml on every node): "
     "put it in a file named by database.password_file, found a password in the URL"),
    ("database: {url: 'mysql://sovereign@db.example/sovereign'}",
     "database.url: expected a PostgreSQL URL postgresql+psycopg://USER@HOST:PORT/DATABASE, found mysql://..."),
    ("database: {url: 'postgresql+psycopg://db.example/sovereign'}", "database.url: expected a user in database.url"),
    ("database: {url: 'postgresql+psycopg://sovereign@db.example:99999/sovereign'}",
     "database.url: expected a PostgreSQL URL postgresql+psycopg://USER@HOST:PORT/DATABASE, found one that does not "
     "parse"),
    ("database: {url: 'postgresql+psycopg://sovereign@db.example/'}",
     "database.url: expected a database name in database.url (postgresql+psycopg://USER@HOST:PORT/DATABASE), "
     "found 'none'"),
    (f"database: {{url: '{URL}?sslrootcert=/etc/ca.pem'}}",
     "database.url: expected no sslrootcert in database.url (the installer sets"),
    (f"database: {{url: '{URL}?sslmode=sometimes'}}",
     "database.url: expected sslmode one of disable, allow, prefer, require, verify-ca, verify-full, "
     "found 'sometimes'"),
    (f"database: {{url: '{URL}', ca: missing-ca.pem}}",
     "database.ca: expected a readable file on this machine, found nothing at "),
    (f"database: {{url: '{URL}', ca: ca.pem, client_cert: ca.pem}}",
     "database: expected client_cert and client_key together (TLS client authentication), found only client_cert"),
    (f"database: {{url: '{URL}', client_cert: ca.pem, client_key: pw}}",
     "database: expected database.ca with client_cert (a client certificate is only sent to a verified server), "
     "found no ca"),
    (f"database: {{url: '{URL}?sslmode=require', ca: ca.pem}}",
     "database: expected sslmode=verify-full (or none: the installer sets it) with database.ca, found sslmode=require"),
    (f"database: {{url: '{URL}', passwd: x}}", "database.passwd: expected only known fields, found unknown field"),
    (f"database: {{url: '{URL}'}}\naudit: {{witness_url: 'https://w.example:8443'}}",
     "audit: expected witness_url and witness_key together (a cosignature is only kept once checked with the "
     "witness's key), found only witness_url"),
    (f"database: {{url: '{URL}'}}\naudit: {{publish_dir: checkpoints}}",
     "audit.publish_dir: expected an absolute path on the gateway nodes without '..', found 'checkpoints'"),
    (f"database: {{url: '{URL}'}}\naudit: {{retention_days: 30}}",
     "audit.retention_days: expected only known fields, found unknown field 'retention_days'"),
])
def test_each_mistake_says_where_what_was_expected_and_what_was_found(tmp_path: Path, section: str,
                                                                     message: str) -> None:
    with pytest.raises(InventoryError) as info:
        load_inventory(write(tmp_path, f"{section}\n{nodes()}"))
    assert f"inventory.yaml: {message}" in str(info.value), str(info.value)
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(("workers", "message"), [
    (", gateway_workers: 0", "nodes[0].gateway_workers: expected greater than or equal to 1, found 0"),
    (", gateway_workers: 65", "nodes[0].gateway_workers: expected less than or equal to 64, found 65"),
    (", gateway_workers: two", "nodes[0].gateway_workers: expected a valid integer, found 'two'"),
])
def test_gateway_workers_must_be_a_sane_count(tmp_path: Path, workers: str, message: str) -> None:
    with pytest.raises(InventoryError, match="inventory.yaml: " + message.replace("[", r"\[").replace("]", r"\]")):
        load_inventory(write(tmp_path, nodes(1, workers)))


def test_gateway_workers_only_on_a_gateway_node(tmp_path: Path) -> None:
    text = (f"nodes:\n  - {{name: gw, roles: [gateway], labels: {LABELS}}}\n"
            f"  - {{name: gpu, connection: ssh, host: 10.0.0.9, roles: [engine], gateway_workers: 2, "
            f"labels: {LABELS}}}\n")
    with pytest.raises(InventoryError, match=r"nodes\[1\]: expected gateway_workers only on a node with the gateway "
                                             r"role, found gateway_workers 2 on a node with roles \['engine'\]"):
        load_inventory(write(tmp_path, text))


def test_one_gateway_without_a_database_stays_on_sqlite(tmp_path: Path) -> None:
    inv = load_inventory(write(tmp_path, nodes(1)))
    assert inv.database is None and inv.nodes[0].workers == 1
    config = render(inv, "gw-1")
    assert "database" not in config and "audit" not in config and config["gateway"]["workers"] == 1
    assert database_vars(inv.database, inv.audit, {}, ["gw-1"], tmp_path)["sovereign_database_urls"] == {}


def test_gateways_share_the_database_with_tls_and_a_password_file_that_no_variable_holds(tmp_path: Path) -> None:
    text = (f"database: {{url: '{URL}?connect_timeout=5', ca: ca.pem, password_file: pw}}\n"
            "audit: {publish_dir: /srv/checkpoints, witness_url: 'https://w.example:8443', witness_key: 'w+1+AAA'}\n"
            + nodes(2, ", gateway_workers: 3"))
    inv = load_inventory(write(tmp_path, text))
    assert inv.database is not None and inv.database.ca == str((tmp_path / "ca.pem").resolve())  # beside the file
    assert [n.workers for n in inv.nodes] == [3, 3, 1]
    work = tmp_path / "work"
    work.mkdir()
    roots = {"gw-1": "/srv/gw1", "gw-2": "/srv/gw2"}
    shared = database_vars(inv.database, inv.audit, roots, ["gw-1", "gw-2"], work)
    assert PASSWORD not in json.dumps(shared) and "s3cret" not in json.dumps(shared)
    assert shared["sovereign_database_urls"]["gw-2"] == (
        f"{URL}?connect_timeout=5&sslmode=verify-full&sslrootcert=/srv/gw2/tls/database/ca.pem"
        "&passfile=/srv/gw2/secrets/database.pgpass")
    assert shared["sovereign_database_migrate_on"] == "gw-1"
    assert shared["sovereign_database_check"] == {"host": "db.example", "port": 5432, "timeout": 10}
    files = {f["dest"]: f for f in shared["sovereign_database_files"]}
    assert sorted(files) == ["secrets/database.pgpass", "tls/database/ca.pem"]
    assert files["secrets/database.pgpass"]["mode"] == "0600"
    pgpass = Path(files["secrets/database.pgpass"]["src"])
    assert stat.S_IMODE(pgpass.stat().st_mode) == 0o600
    assert pgpass.read_text() == "*:*:*:sovereign:s3cret\\:pw\\\\with-escapes\n"  # libpq's escapes
    for name in ("gw-1", "gw-2"):
        config = render(inv, name)
        assert config["database"] == {"url": shared["sovereign_database_urls"][name].replace("/srv/" + name.replace(
            "-", ""), "/opt/sovereign")}
        assert config["gateway"]["workers"] == 3
        assert config["audit"] == {"publish_dir": "/srv/checkpoints", "witness_url": "https://w.example:8443",
                                   "witness_key": "w+1+AAA"}
    engine = render(inv, "gpu-1")
    assert "database" not in engine and "audit" not in engine and "workers" not in engine["gateway"]


def test_the_appliance_reads_what_the_installer_writes(tmp_path: Path) -> None:
    """appliance/config.py accepts the database and audit sections as rendered."""
    from appliance.config import load_config

    inv = load_inventory(write(tmp_path, f"database: {{url: '{URL}', ca: ca.pem}}\n"
                                         f"audit: {{publish_dir: /srv/cp}}\n{nodes(2)}"))
    root = tmp_path / "node"
    (root / "current").mkdir(parents=True)
    (root / "current" / "appliance.yaml").write_text(yaml.safe_dump(render(inv, "gw-1")))
    config = load_config(root)
    assert config.db_url == f"{URL}?sslmode=verify-full&sslrootcert=/opt/sovereign/tls/database/ca.pem"
    assert config.audit_anchors.publish_dir == Path("/srv/cp")


def test_preflight_checks_the_database_from_a_local_gateway_node(tmp_path: Path) -> None:
    import socket

    from installer.preflight import FAIL, PASS, WARN, check_database

    def inventory(port: int) -> Path:
        remote = nodes(2).replace("gw-1, connection: ssh, host: 10.0.0.1", "here")  # gw-2 and gpu-1 over SSH
        return write(tmp_path, f"database: {{url: 'postgresql+psycopg://sovereign@127.0.0.1:{port}/sovereign', "
                               f"connect_timeout_s: 3}}\n{remote}")

    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        check = check_database(load_inventory(inventory(port)))
        assert check is not None and check.status == PASS, check
        assert f"127.0.0.1:{port} accepts connections from here; gateway nodes ['gw-2'] check it" in check.detail
    check = check_database(load_inventory(inventory(port)))  # nothing listens there now
    assert check is not None and check.status == FAIL, check
    assert check.detail.startswith(f"expected the database server at 127.0.0.1:{port} to accept a connection, "
                                   "found "), check.detail
    remote_only = write(tmp_path, f"database: {{url: '{URL}'}}\n{nodes(2)}")
    check = check_database(load_inventory(remote_only))
    assert check is not None and check.status == WARN and "check it at the start of install" in check.detail
    assert check_database(load_inventory(write(tmp_path, nodes(1)))) is None
