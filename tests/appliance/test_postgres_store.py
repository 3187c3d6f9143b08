"""The appliance's own tables (tenants, keys, admins, nodes, usage) on SQLite and on a real PostgreSQL.

``open_database`` takes any SQLAlchemy URL; these tests run the stores the gateway uses against
each back end (the PostgreSQL run gets a fresh database on a real server, tests/pg.py, and
skips without one): the tables are created, keys are issued and looked up, budgets are reserved
atomically by two stores at once (as two gateways would), nodes change state, and several
processes may open an empty database at the same moment.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from appliance.db import open_database
from appliance.nodes import NodeRegistry
from appliance.tenancy import TenantStore
from appliance.usage import UsageStore
from tests.conftest import REPO_ROOT

TABLES = {"tenants", "api_keys", "admins", "admin_keys", "nodes"}
NOON = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.UTC)


@dataclass(frozen=True)
class Limits:
    max_tokens_per_day: int = 0
    max_tokens_per_month: int = 0


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'appliance.db'}"
    return str(request.getfixturevalue("postgres_db_url"))


def test_open_database_creates_every_table_and_reopens(store_url: str) -> None:
    engine = open_database(store_url)
    try:
        TenantStore(engine), NodeRegistry(engine), UsageStore(engine)
        tables = set(sa.inspect(engine).get_table_names())
        assert TABLES <= tables and any("usage" in t for t in tables), tables
        TenantStore(engine).create_tenant("acme")
    finally:
        engine.dispose()
    again = open_database(store_url)  # a second gateway, or a restart: creating and migrating is a no-op
    try:
        assert [t.name for t in TenantStore(again).list_tenants()] == ["acme"]
    finally:
        again.dispose()


def test_tenant_key_lookup_and_revocation(store_url: str) -> None:
    engine = open_database(store_url)
    try:
        store = TenantStore(engine)
        store.create_tenant("acme", ["SmolLM2-*"])
        issued = store.issue_key("acme", "ci", scopes=["inference", "audit:read"])
        check = store.check(issued.secret)
        assert check.ok and check.tenant == "acme" and check.scopes == ("inference", "audit:read")
        assert check.models == ("SmolLM2-*",)
        info = store.get_key(issued.key_id)
        assert info is not None and info.owner == "acme" and issued.secret not in json.dumps(info.__dict__, default=str)
        assert [k.key_id for k in store.list_keys(tenant="acme")] == [issued.key_id]
        assert store.authenticate(issued.secret) == ("acme", issued.key_id)
        assert store.check(issued.secret[:-1] + ("A" if issued.secret[-1] != "A" else "B")).code == "invalid_api_key"
        store.revoke_key(issued.key_id)
        assert store.check(issued.secret).code == "invalid_api_key"
        # a second store on the same database (another gateway) sees the revocation
        assert not TenantStore(open_database(store_url)).check(issued.secret).ok
        admin = store.admins.create_admin("alice", "test")
        assert store.check(admin.secret).admin == "alice"
    finally:
        engine.dispose()


def test_usage_reserve_settle_and_no_overspending_across_two_stores(store_url: str) -> None:
    engines = [open_database(store_url), open_database(store_url)]  # two "gateways"
    try:
        stores = [UsageStore(e) for e in engines]
        limits = Limits(max_tokens_per_day=1000)
        one = stores[0].reserve("acme", 100, limits, now=NOON)
        assert one.allowed and one.reservation is not None
        stores[1].settle("acme", one.reservation, 40)  # settled by the other store: same rows
        stores[1].flush()  # (settlements are written in batches)
        day, month = stores[0].usage("acme", limits, now=NOON)
        assert (day.tokens, month.tokens, day.requests) == (40, 40, 1)

        def reserve(i: int) -> bool:
            return stores[i % 2].reserve("acme", 30, limits, now=NOON).allowed

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(reserve, range(80)))
        assert sum(results) == (1000 - 40) // 30  # 32 fit, whatever the interleaving
        day, _ = stores[1].usage("acme", limits, now=NOON)
        assert day.tokens == 40 + 32 * 30 and day.requests == 1 + 32  # refusals consumed nothing
    finally:
        for engine in engines:
            engine.dispose()


def test_nodes_are_registered_and_change_state(store_url: str) -> None:
    engine = open_database(store_url)
    try:
        nodes = NodeRegistry(engine)
        nodes.add("gpu-1", "https://10.0.0.5:9443", {"region": "eu-west", "site": "dc1"}, ["SmolLM2-*"])
        assert nodes.set_state("gpu-1", "draining", expect=("active",)) is not None
        assert nodes.set_health("gpu-1", "down", "connection refused")
        node = NodeRegistry(open_database(store_url)).require("gpu-1")
        assert (node.state, node.health, node.labels["region"]) == ("draining", "down", "eu-west")
        nodes.remove("gpu-1")
        assert nodes.all() == []
    finally:
        engine.dispose()


def _when_ready(flags: list[Path], procs: list[subprocess.Popen[str]]) -> None:
    """Wait until every process has imported everything (its flag file exists), or one has died."""
    deadline = time.monotonic() + 120
    while not all(f.exists() for f in flags) and time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            return  # its output says why
        time.sleep(0.02)


_OPENER = """
import sys, time
from pathlib import Path
from appliance.db import open_database
from appliance.nodes import NodeRegistry
from appliance.tenancy import TenantStore
from appliance.usage import UsageStore
start, deadline = Path(sys.argv[3]), time.monotonic() + 120
Path(f"{start}.{sys.argv[2]}").touch()  # imported: ready
while not start.exists() and time.monotonic() < deadline:  # all open the database at the same moment
    time.sleep(0.005)
engine = open_database(sys.argv[1])
TenantStore(engine).create_tenant(sys.argv[2])
NodeRegistry(engine), UsageStore(engine)
print("ok")
"""


def test_gateways_starting_together_on_an_empty_database(store_url: str, tmp_path: Path) -> None:
    """Several processes create the schema of one new database at the same moment: none may fail
    (on PostgreSQL they raced to CREATE TABLE: a duplicate pg_type row, IntegrityError)."""
    start = tmp_path / "start"
    procs = [subprocess.Popen([sys.executable, "-c", _OPENER, store_url, f"t{n}", str(start)], cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in range(4)]
    _when_ready([tmp_path / f"start.t{n}" for n in range(4)], procs)
    start.touch()
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0 and out.strip() == "ok", err[-2000:]
    engine = open_database(store_url)
    try:
        assert sorted(t.name for t in TenantStore(engine).list_tenants()) == ["t0", "t1", "t2", "t3"]
    finally:
        engine.dispose()


@pytest.mark.parametrize(("url", "fragment"), [
    ("mysql://u@h/db", "expected a sqlite or postgresql URL, found mysql://"),
    ("not a url", "expected sqlite:///PATH or postgresql+psycopg://"),
])
def test_an_unusable_database_url_is_refused_clearly(url: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        open_database(url)


def test_a_password_never_appears_in_the_refusal() -> None:
    with pytest.raises(ValueError) as info:
        open_database("postgresql+psycopg://app:s3cret-pw@db.example:5432:99/appliance")
    assert "s3cret-pw" not in str(info.value) and "app:***@" in str(info.value)
