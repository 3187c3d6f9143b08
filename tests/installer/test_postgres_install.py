"""Two gateway nodes on one PostgreSQL (issue 17), installed for real: three SSH hosts in network
namespaces (two gateways, one engine node), one `sovereign-installer install` run with a
``database:`` section naming a fresh database on the test PostgreSQL (tests/pg.py: the one CI
started, else a throwaway cluster) and a password file. The hosts reach the controller only at its
bridge address, the server listens on 127.0.0.1: a relay (tests/installer/tcprelay.py) carries the
connections, bytes unchanged. The server trusts loopback connections, so the password file is
copied and named but never asked for here (tests/appliance/test_db_cli.py checks password and TLS).

The install runs `appliance db migrate` on gw-1 before any gateway starts; both gateways then
answer /health, and a tenant and key created on gw-1 authenticate on gw-2, which serves a chat
completion whose audit record lands in the shared database. A second run against a database nobody
listens on fails before any node changes; an upgrade migrates with the new release on gw-1 first.
Measured on the shared 2-core machine at load 6-10: install 7-10.5 minutes (three runtimes built from
the wheels, one node after the other), upgrade 4.5-9, the module 12-19 minutes; the fleet install
test's 3 minutes for the install were measured on a quieter machine.
"""

from __future__ import annotations

import json
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import sqlalchemy as sa

from tests.installer.fleet import GATEWAY_PORT, Fleet, NodeSpec, fleet_bundle, install, installed_fleet, run_installer
from tests.installer.sshhosts import SshHosts, ssh_unavailable
from tests.installer.tcprelay import tcp_relay
from tests.installer.test_fleet_install import wait_for_active_nodes
from tests.pg import PostgresUnavailable, fresh_database, postgres_server

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"
PASSWORD = "never-shown-7f3a"
SPECS = (NodeSpec("gw-1", ("gateway",), "a"), NodeSpec("gw-2", ("gateway",), "a"), NodeSpec("gpu-1", ("engine",), "a"))


@pytest.fixture(scope="module")
def pg_fleet(tmp_path_factory: pytest.TempPathFactory, keys: Path, model_dir: Path,
             wheelhouse: Path) -> Iterator[tuple[Fleet, str]]:
    """The installed fleet and the URL of its database as the controller reaches it."""
    why = ssh_unavailable()
    if why:
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("pgfleet")
    password_file = tmp / "db-password"
    password_file.write_text(PASSWORD + "\n")
    password_file.chmod(0o600)
    try:
        server = postgres_server()
        admin = server.__enter__()
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))
    try:
        with fresh_database(admin, "pgfleet") as url:
            parsed = sa.engine.make_url(url)
            relays = []

            def configure(hosts: SshHosts, inventory: dict[str, Any]) -> None:
                relay = tcp_relay(hosts.controller_address, (parsed.host or "127.0.0.1", parsed.port or 5432))
                relays.append(relay)
                port = relay.__enter__().port
                inventory["database"] = {
                    "url": f"postgresql+psycopg://{parsed.username}@{hosts.controller_address}:{port}/"
                           f"{parsed.database}?connect_timeout=10",
                    "password_file": str(password_file)}
                inventory["nodes"][1]["gateway_workers"] = 2

            try:
                with installed_fleet(tmp, keys, model_dir, wheelhouse, SPECS, configure) as fleet:
                    yield fleet, url
            finally:
                for relay in relays:
                    relay.__exit__(None, None, None)
    finally:
        server.__exit__(None, None, None)


def test_the_first_gateway_migrates_the_shared_database_and_both_are_configured_for_it(
        pg_fleet: tuple[Fleet, str]) -> None:
    fleet, url = pg_fleet
    notes = "\n".join(fleet.install["notes"])
    assert "gw-1: database PostgreSQL postgres@" in notes and "schema current" in notes, notes
    assert "gw-2: database" not in notes  # migrated once, by the first gateway
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        tables = set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {"tenants", "api_keys", "audit_events", "audit_tree_nodes"} <= tables, tables
    for name, workers in (("gw-1", 1), ("gw-2", 2)):
        config = fleet.config(name)
        root = fleet.root(name)
        assert config["database"]["url"].endswith(f"passfile={root}/secrets/database.pgpass"), config
        assert config["gateway"]["workers"] == workers
        pgpass = root / "secrets" / "database.pgpass"
        assert stat.S_IMODE(pgpass.stat().st_mode) == 0o600 and PASSWORD in pgpass.read_text()
        assert PASSWORD not in (root / "current" / "appliance.yaml").read_text()
        check = fleet.appliance(name, "db", "check", "--json")
        assert check.returncode == 0 and json.loads(check.stdout)["schema"]["state"] == "current", check.stderr
    gpu = fleet.config("gpu-1")
    assert "database" not in gpu and not (fleet.root("gpu-1") / "secrets" / "database.pgpass").exists()
    journal = (fleet.controller_root / "journal" / "installer.jsonl").read_text()
    assert PASSWORD not in journal + json.dumps(fleet.install)


def test_both_gateways_answer_and_share_a_tenant_created_through_one(pg_fleet: tuple[Fleet, str]) -> None:
    fleet, url = pg_fleet
    ctx = ssl.create_default_context(cafile=str(fleet.ca))
    gateways = {name: f"https://{fleet.address(name)}:{GATEWAY_PORT}" for name in ("gw-1", "gw-2")}
    with httpx.Client(verify=ctx, timeout=30) as client:
        for base in gateways.values():
            health = client.get(f"{base}/health").json()
            assert health["status"] == "ok" and health["version"] == "0.1.0", health
    created = fleet.appliance("gw-1", "tenants", "create", "shared-pg", "--models", MODEL)
    assert created.returncode == 0, created.stderr
    issued = fleet.appliance("gw-1", "keys", "issue", "shared-pg", "--json")
    assert issued.returncode == 0, issued.stderr
    key = json.loads(issued.stdout)["key"]
    with httpx.Client(verify=ctx, timeout=30) as client:
        for base in gateways.values():  # the key issued on gw-1 authenticates on both
            listed = client.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert listed.status_code == 200 and MODEL in listed.text, listed.text
            refused = client.get(f"{base}/v1/models", headers={"Authorization": "Bearer not-a-key"})
            assert refused.status_code == 401
    wait_for_active_nodes(fleet, ["gpu-1"])
    api = openai.OpenAI(base_url=f"{gateways['gw-2']}/v1", api_key=key, max_retries=0,
                        http_client=httpx.Client(verify=ctx, timeout=180))
    reply = api.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, messages=[
        {"role": "user", "content": "What is the capital of France?"}])
    assert reply.choices[0].message.content
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            kinds = conn.execute(sa.text("SELECT event_type FROM audit_events WHERE stream = 'shared-pg' AND "
                                         "request_id = :rid"), {"rid": reply.id}).scalars().all()
    finally:
        engine.dispose()
    assert "completed" in kinds, kinds  # gw-2's audit record, in the database gw-1 migrated


def test_a_database_the_gateways_cannot_reach_fails_the_run_before_any_node_changes(
        pg_fleet: tuple[Fleet, str], tmp_path: Path) -> None:
    import socket

    import yaml

    fleet, _ = pg_fleet
    inventory = yaml.safe_load(fleet.inventory.read_text())
    with socket.socket() as sock:  # a port on the bridge address nothing listens on
        sock.bind((fleet.hosts.controller_address, 0))
        closed = sock.getsockname()[1]
    inventory["database"]["url"] = inventory["database"]["url"].replace(
        f":{sa.engine.make_url(inventory['database']['url']).port}/", f":{closed}/")
    inventory["database"]["connect_timeout_s"] = 3
    bad = tmp_path / "unreachable.yaml"
    bad.write_text(yaml.safe_dump(inventory))
    before = {name: fleet.config(name) for name in ("gw-1", "gw-2")}
    proc = run_installer("install", "--bundle", str(fleet.bundle), "--trusted-root", str(fleet.trusted_root),
                         "--root", str(fleet.controller_root), "--inventory", str(bad), "--allow-cpu", "--json")
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert f"expected the database server at {fleet.hosts.controller_address}:{closed} to accept a connection" \
           in output, output[-3000:]
    assert PASSWORD not in output
    assert {name: fleet.config(name) for name in ("gw-1", "gw-2")} == before
    assert fleet.status("gw-1")["healthy"]


def test_an_upgrade_migrates_with_the_new_release_before_any_gateway_restarts(
        pg_fleet: tuple[Fleet, str], keys: Path, model_dir: Path, wheelhouse: Path, tmp_path: Path) -> None:
    """A table the new release needs is missing (dropped behind the appliance's back, as if 0.2.0
    had added it): gw-1 creates it with 0.2.0 before its gateway starts, then gw-2 follows."""
    fleet, url = pg_fleet
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE audit_legal_holds")
        result = install(fleet, fleet_bundle(tmp_path, keys, model_dir, wheelhouse, "0.2.0"), "upgrade")
        assert "audit_legal_holds" in sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()
    notes = "\n".join(result["notes"])
    assert "gw-1: database PostgreSQL postgres@" in notes and "created 1 tables, schema current" in notes, notes
    order = [(t["host"], t["task"]) for t in result["playbook"]["task_times"]]
    migrated = order.index(("gw-1", "sovereign_database : Create or upgrade the database schema with the new release"))
    starts = [i for i, (host, task) in enumerate(order)
              if host in ("gw-1", "gw-2") and task == "Start the release and wait for its health check"]
    assert len(starts) == 2 and migrated < min(starts), order
    migrations = [r for r in result["playbook"]["service"] if r.get("action") == "migrate"]
    assert [r["host"] for r in migrations] == ["gw-1"], migrations  # once, on the first gateway
    for name in ("gw-1", "gw-2"):
        assert fleet.config(name)["version"] == "0.2.0" and fleet.status(name)["healthy"], name
